"""Train the CNN from scratch, in PyTorch or in Keras (`train.framework`).

Reads the prepared train/val splits (`data/prepared`); writes the model folder
(`models/scratch/`: model.json and model.pt or model.keras), its metrics and its per-epoch
curves (`dvclive/train/`). Both frameworks build the same network from the same params and
train it with the same recipe (`frameworks.torch.recipe.fit`, `frameworks.keras.recipe.fit`);
only `frameworks.registry` knows which.
"""

from __future__ import annotations

import time

from pipeline import cli, config, files
from pipeline.data import review
from pipeline.experiments import trial
from pipeline.frameworks import card, registry
from pipeline.frameworks.interface import RuntimeParams
from pipeline.frameworks.recipe import augmentation, resolve_auto
from pipeline.frameworks.scratch import TrainParams, channel_stats, model_args
from pipeline.frameworks.torch import torchrun
from pipeline.runtime import checkpoints, launch
from pipeline.tracking import store
from pipeline.tracking.run import stage_run

__all__ = ["TrainParams", "channel_stats", "main", "model_args"]  # the train section's params and the model's args


def main(argv: list[str] | None = None) -> None:
    torchrun.relaunch("train", argv or [])  # nproc > 1: this process becomes torchrun's agent, exits with the ranks
    args = cli.fit_paths(argv, __doc__, "train", "scratch")
    p = config.load("train", TrainParams)
    rt = config.load("runtime", RuntimeParams)
    files.verify_folder(args.data, "prepare")
    backend = registry.get(p.framework, rt, p.seed)  # seeds, threads, deterministic kernels, device
    train_set, val_set = review.load_training(args.data, args.applied)
    margs = model_args(p, train_set)
    model = backend.build("scratch_cnn", margs)
    with stage_run("train", {"train": p, "runtime": rt}, live_dir=args.live) as run:
        run.set_tags(backend.describe())
        if (prune := trial.epoch_hook("train")) is not None:  # a trial of `python -m pipeline.experiments.sweep`
            run.epoch_hooks.append(prune)
        run.log_dataset(args.data, "training")
        fit_p = resolve_auto(p, len(train_set))
        run.log_choices({"input_size": margs["input_size"], "augment": augmentation(p, train_set.image_size),
                         "batch_size": fit_p.batch_size, "epochs": fit_p.epochs,
                         "early_stopping_patience": fit_p.early_stopping_patience})
        # per-epoch checkpoints outside DVC's outputs: a killed run resumes
        saved = checkpoints.for_stage(store.repo_root(), "train", {"train": p, "runtime": rt}, [args.data],
                                      backend.describe())
        started = time.perf_counter()
        result = backend.fit(model, train_set, val_set, fit_p, run, desc=f"train ({p.framework})",
                             checkpoint=saved.slot("fit", backend.checkpoint_suffix))
        seconds = time.perf_counter() - started
        run.log_summary({"best/epoch": result.best_epoch, "best/val_loss": result.best_val_loss,
                         "best/val_acc": result.best_val_acc, "epochs_run": result.epochs_run})
        run.log_timing({"fit_seconds": seconds, "images_per_second": result.epochs_run * len(train_set) / seconds})
        if launch.rank() == 0:  # under torchrun the ranks hold equal weights; one writes them
            card.save(args.out, backend, model, "scratch_cnn", margs, train_set.classes)
            run.log_artifact(args.out, "model")
            saved.clear()


if __name__ == "__main__":
    main()
