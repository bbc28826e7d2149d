"""Benchmark: the scratch CNN's training throughput in Keras against PyTorch, side by side.

    python -m bench.frameworks [--epochs N] [--repeats 2]   # needs data/prepared (dvc repro prepare)

Each measurement is a fresh process, as DVC runs the train stage, that fits the train params
from params.yaml (all its epochs, unless `--epochs`; early stopping off, so both run every
epoch, and the first epoch's one-off costs weigh the same) through `backends` (the stage's own code path, with
its per-epoch validation pass) on the prepared train split; torch and keras alternate so
that machine noise hits both alike. Reported per framework: the median images per second
the cost of `registry.get` (for keras, TensorFlow's import and configuration; torch is
imported by the train module in both), and the keras / torch throughput ratio. Results go to stdout and
bench/results/frameworks.md; nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time

from bench import REPO, report

FRAMEWORKS = ("torch", "keras")


def child(framework: str, epochs: int | None) -> dict:
    """One fit in this process; returns its figures."""
    from pipeline import config, train
    from pipeline.data import formats
    from pipeline.frameworks import registry
    from pipeline.frameworks.interface import RuntimeParams

    p = config.load("train", train.TrainParams)
    p = dataclasses.replace(p, framework=framework, epochs=epochs or p.epochs, early_stopping_patience=0)
    rt = config.load("runtime", RuntimeParams)
    started = time.perf_counter()
    backend = registry.get(framework, rt, p.seed)
    startup = time.perf_counter() - started
    trn, val = formats.load_split(REPO / "data/prepared", "train"), formats.load_split(REPO / "data/prepared", "val")
    model = backend.build("scratch_cnn", train.model_args(p, trn))
    started = time.perf_counter()
    result = backend.fit(model, trn, val, p, None, desc=f"bench {framework}")
    seconds = time.perf_counter() - started
    return {"images_per_second": result.epochs_run * len(trn) / seconds, "epochs": result.epochs_run,
            "startup_seconds": startup, "val_acc": result.history[-1]["val/acc"], "train_images": len(trn),
            "threads": rt.thread_count}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: train.epochs")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.epochs)))
        return
    if not (REPO / "data/prepared/train_images.npy").is_file():
        sys.exit("bench.frameworks needs data/prepared: run `dvc repro prepare` first")
    runs: dict[str, list[dict]] = {name: [] for name in FRAMEWORKS}
    for _ in range(args.repeats):
        for name in FRAMEWORKS:
            epochs = ["--epochs", str(args.epochs)] if args.epochs else []
            done = subprocess.run([sys.executable, "-m", "bench.frameworks", "--child", name, *epochs],
                                  cwd=REPO, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rate = {name: statistics.median(r["images_per_second"] for r in v) for name, v in runs.items()}
    startup = {name: statistics.median(r["startup_seconds"] for r in v) for name, v in runs.items()}
    first = runs["torch"][0]
    lines = [
        f"Train params from params.yaml, {first['epochs']} epochs on {first['train_images']} training images "
        f"(each with its validation pass), {first['threads']} threads, CPU; medians of {args.repeats} "
        "fresh processes per framework, alternating.", "",
        "| framework | images/s | registry.get (s) | last val acc |", "|---|---|---|---|",
        *(
            f"| {name} | {rate[name]:,.0f} | {startup[name]:.1f} | {runs[name][-1]['val_acc']:.4f} |"
            for name in FRAMEWORKS
        ),
        "", f"- keras / torch throughput: {rate['keras'] / rate['torch']:.2f}",
    ]
    report("Keras against PyTorch: scratch CNN training throughput", lines, "frameworks")


if __name__ == "__main__":
    main()
