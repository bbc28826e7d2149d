"""Train the CNN from scratch.

Reads the prepared train/val splits (`data/prepared`); writes the checkpoint
(`models/scratch.pt`), its metrics and its per-epoch curves (`dvclive/train/`).
"""

from __future__ import annotations

from pipeline import tracking

if __name__ == "__main__":
    # MLflow's start-up (~4 s) runs in a worker process while this one imports torch & co.
    tracking.start_worker()

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import config, data, engine, models, runtime
from pipeline.config import check


@dataclass(frozen=True)
class TrainParams(engine.FitParams):
    dropout: float = 0.3
    batch_norm: bool = True
    conv3: bool = True  # the optional third conv block (128 filters)
    hidden: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(self.hidden >= 1, "hidden", f"must be at least 1, got {self.hidden}")


def channel_stats(split: data.Split) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the training images in [0, 1], for the model's normalisation."""
    pixels = np.asarray(split.images, dtype=np.float64).reshape(-1, split.channels) / 255
    std = np.maximum(pixels.std(0), 1e-3)  # a blank channel must not divide by zero
    return tuple(round(float(v), 6) for v in pixels.mean(0)), tuple(round(float(v), 6) for v in std)


def model_args(p: TrainParams, train: data.Split) -> dict:
    mean, std = channel_stats(train)
    return {
        "num_classes": train.num_classes,
        "in_channels": train.channels,
        "image_size": train.image_size,
        "conv3": p.conv3,
        "batch_norm": p.batch_norm,
        "dropout": p.dropout,
        "hidden": p.hidden,
        "mean": mean,
        "std": std,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--out", type=Path, default=Path("models/scratch.pt"))
    parser.add_argument("--live", type=Path, default=Path("dvclive/train"))
    args = parser.parse_args(argv)
    p = config.load("train", TrainParams)
    rt = config.load("runtime", runtime.RuntimeParams)
    device = runtime.configure(rt)
    generator = runtime.seed_everything(p.seed)
    train_set, val_set = data.load_split(args.data, "train"), data.load_split(args.data, "val")
    margs = model_args(p, train_set)
    model = models.ScratchCNN(**margs)
    with tracking.stage_run("train", {"train": p, "runtime": rt}, live_dir=args.live) as run:
        run.set_tags(runtime.describe(device, rt))
        started = time.perf_counter()
        result = engine.fit(model, train_set, val_set, p, device, generator, run, desc="train")
        seconds = time.perf_counter() - started
        run.log_summary({"best/epoch": result.best_epoch, "best/val_loss": result.best_val_loss,
                         "best/val_acc": result.best_val_acc, "epochs_run": result.epochs_run})
        run.log_timing({"fit_seconds": seconds, "images_per_second": result.epochs_run * len(train_set) / seconds})
        models.save_checkpoint(args.out, model, "scratch_cnn", margs, train_set.classes)
        run.log_artifact(args.out, "model")


if __name__ == "__main__":
    main()
