"""Benchmark: the scratch CNN's training throughput in Keras against PyTorch, side by side.

    python -m bench.frameworks [--repeats 2]            # both datasets below (make bench)
    python -m bench.frameworks --data digits --epochs 5
    python -m bench.frameworks --child keras --device cuda  # one fit, as bench/gpu.py runs it

Two datasets, each with the train params from params.yaml (early stopping off, so both
frameworks run every epoch and the first epoch's one-off costs weigh the same):
- `digits`: the prepared split in data/prepared (`dvc repro prepare`), all of train.epochs;
- `mnist28`: an MNIST-sized 28x28 split made here (the bundled digits upscaled, shifted and
  noised: `bench.data.synthetic_digits`), `--n` training images (60,000, as MNIST), 2 epochs.

Each measurement is a fresh process, as DVC runs the train stage, pinned as the stage pins it
(`runtime.portable`), that fits through `frameworks.registry` (the stage's own code path, with
its per-epoch validation pass); torch and keras alternate so that machine noise hits both
alike. Reported per framework: the median images per second, the cost of `registry.get` (for
keras, TensorFlow's import and configuration; torch is imported by the train module in both,
but torch._dynamo, which torch.optim imports on first use, is counted here, not in the fit),
and the keras / torch throughput ratio. Results go to stdout and bench/results/frameworks.md;
nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import subprocess
import sys
import time

import numpy as np

from bench import REPO, report

FRAMEWORKS = ("torch", "keras")
DATASETS = ("digits", "mnist28")
MNIST_EPOCHS = 2


def split_of(data: str, n: int):
    """(train, val) splits for `data`: the prepared digits, or n + n/6 synthetic 28x28 digits."""
    from pipeline.data import formats

    if data == "digits":
        return formats.load_split(REPO / "data/prepared", "train"), formats.load_split(REPO / "data/prepared", "val")
    from bench.data import synthetic_digits

    images, labels = synthetic_digits(n + n // 6)
    classes = tuple(str(d) for d in range(10))
    train = formats.Split(images[:n, ..., None], labels[:n].astype(np.int64), classes)
    return train, formats.Split(images[n:, ..., None], labels[n:].astype(np.int64), classes)


def digest(framework: str, model) -> str:
    """The trained weights' sha256 (first 16 hex digits): equal digests, equal weights."""
    if framework == "keras":
        arrays = model.get_weights()
    else:
        arrays = [v.detach().cpu().numpy() for v in model.state_dict().values()]
    return hashlib.sha256(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()[:16]


def child(framework: str, data: str, epochs: int | None, n: int, device: str) -> dict:
    """One fit in this process, pinned and configured as the train stage is; returns its figures."""
    from pipeline.runtime import portable

    portable.pin(portable.requested())  # before torch or TensorFlow loads, as `python -m pipeline` does
    from pipeline import config, train
    from pipeline.frameworks import registry
    from pipeline.frameworks.interface import RuntimeParams

    p = config.load("train", train.TrainParams)
    default_epochs = p.epochs if data == "digits" else MNIST_EPOCHS
    p = dataclasses.replace(p, framework=framework, epochs=epochs or default_epochs, early_stopping_patience=0)
    rt = dataclasses.replace(config.load("runtime", RuntimeParams), device=device)
    started = time.perf_counter()
    backend = registry.get(framework, rt, p.seed)
    if framework == "torch":  # torch.optim imports torch._dynamo on the first optimizer made: about
        import torch._dynamo  # noqa: F401  1 s, start-up as TensorFlow's import is, so counted here
    startup = time.perf_counter() - started
    trn, val = split_of(data, n)
    model = backend.build("scratch_cnn", train.model_args(p, trn))
    started = time.perf_counter()
    result = backend.fit(model, trn, val, p, None, desc=f"bench {framework}")
    seconds = time.perf_counter() - started
    return {"images_per_second": result.epochs_run * len(trn) / seconds, "epochs": result.epochs_run,
            "startup_seconds": startup, "val_acc": result.history[-1]["val/acc"], "train_images": len(trn),
            "side": trn.image_size, "threads": rt.thread_count, "device": backend.describe()["device"],
            "digest": digest(framework, model)}


def measure(data: str, args: argparse.Namespace) -> list[str]:
    runs: dict[str, list[dict]] = {name: [] for name in FRAMEWORKS}
    for _ in range(args.repeats):
        for name in FRAMEWORKS:
            extra = ["--epochs", str(args.epochs)] if args.epochs else []
            cmd = [sys.executable, "-m", "bench.frameworks", "--child", name, "--data", data, "--n", str(args.n),
                   *extra]
            done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"bench.frameworks: {name} on {data} failed:\n{done.stderr[-3000:]}")
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rate = {name: statistics.median(r["images_per_second"] for r in v) for name, v in runs.items()}
    startup = {name: statistics.median(r["startup_seconds"] for r in v) for name, v in runs.items()}
    same = {name: len({r["digest"] for r in v}) == 1 for name, v in runs.items()}
    first = runs["torch"][0]
    return [
        f"## {data}: {first['train_images']:,} training images of {first['side']}x{first['side']}, "
        f"{first['epochs']} epochs", "",
        f"Each epoch with its validation pass, {first['threads']} threads, CPU; medians of {args.repeats} "
        "fresh processes per framework, alternating.", "",
        "| framework | images/s | registry.get (s) | last val acc | repeats' weights identical |",
        "|---|---|---|---|---|",
        *(f"| {name} | {rate[name]:,.0f} | {startup[name]:.1f} | {runs[name][-1]['val_acc']:.4f} | {same[name]} |"
          for name in FRAMEWORKS),
        "", f"- keras / torch throughput: **{rate['keras'] / rate['torch']:.2f}**", "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", choices=DATASETS, help="default: both")
    parser.add_argument("--epochs", type=int, help=f"default: train.epochs (digits), {MNIST_EPOCHS} (mnist28)")
    parser.add_argument("--n", type=int, default=60_000, help="mnist28's training images")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    parser.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.data or "digits", args.epochs, args.n, args.device)))
        return
    datasets = [args.data] if args.data else list(DATASETS)
    if "digits" in datasets and not (REPO / "data/prepared/train_images.npy").is_file():
        sys.exit("bench.frameworks needs data/prepared for the digits: run `dvc repro prepare` first")
    lines = [line for data in datasets for line in measure(data, args)]
    report("Keras against PyTorch: scratch CNN training throughput", lines, "frameworks")


if __name__ == "__main__":
    main()
