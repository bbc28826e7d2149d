"""Benchmark: ingest + prepare on a 60,000-image, 28x28 dataset, as `dvc repro` runs them.

    python -m bench.data            # both layouts (make bench)
    python -m bench.data --n 10000  # smaller

Two layouts of the same synthetic MNIST-sized data (real digits, upscaled to 28x28, shifted
and noised so that every image is distinct):
1. `data.source: mnist` from IDX .gz files in torchvision's layout;
2. `data.source: folder`, one PNG file per image in ten class folders.
Each stage runs as its own process (`python -m pipeline <stage>`), timed end to end, with
the workers the machine has. Results go to stdout and bench/results/data.md; nothing here is
asserted in tests.
"""

from __future__ import annotations

import argparse
import gzip
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench import REPO, report
from bench.pipeline import bench_env
from pipeline.data import parallel
from pipeline.data.sources import standard


def synthetic_digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n distinct 28x28 uint8 digits: the bundled 8x8 ones upscaled, shifted and noised."""
    pixels, labels = standard.read_array_dataset("digits", Path("."), False).splits[""]
    big = np.stack([np.asarray(Image.fromarray(p).resize((20, 20), Image.Resampling.BILINEAR)) for p in pixels])
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(big), n)
    out = np.zeros((n, 28, 28), np.uint8)
    dy, dx = rng.integers(0, 9, (2, n))
    for i in range(n):
        out[i, dy[i] : dy[i] + 20, dx[i] : dx[i] + 20] = big[pick[i]]
    noisy = out.astype(np.int16) + rng.integers(-8, 9, out.shape, dtype=np.int16)
    return np.clip(noisy, 0, 255).astype(np.uint8), labels[pick].astype(np.uint8)


def write_idx(root: Path, images: np.ndarray, labels: np.ndarray, n_test: int) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    parts = {"train": slice(n_test, None), "t10k": slice(0, n_test)}
    for prefix, part in parts.items():
        x, y = images[part], labels[part]
        with gzip.open(raw / f"{prefix}-images-idx3-ubyte.gz", "wb", compresslevel=1) as f:
            f.write(struct.pack(">IIII", 0x803, len(x), 28, 28) + x.tobytes())
        with gzip.open(raw / f"{prefix}-labels-idx1-ubyte.gz", "wb", compresslevel=1) as f:
            f.write(struct.pack(">II", 0x801, len(y)) + y.tobytes())


def write_folder(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    for digit in range(10):
        (folder / str(digit)).mkdir(parents=True)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        Image.fromarray(image).save(folder / str(label) / f"{i:05d}.png")


def time_stages(work: Path, params: str) -> dict[str, float]:
    (work / "params.yaml").write_text(params)
    env = bench_env(work)
    import mlflow

    mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments()  # schema creation is not the stages' cost
    seconds = {}
    for stage in ("ingest", "prepare"):
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "pipeline", stage],
            cwd=work, env={**env, "PYTHONPATH": str(REPO)}, check=True, capture_output=True,
        )
        seconds[stage] = time.perf_counter() - started
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=60_000)
    args = parser.parse_args()
    images, labels = synthetic_digits(args.n)
    prepare = "prepare: {seed: 0, image_size: 28}\n"
    lines = [f"## ingest + prepare, {args.n:,} images of 28x28, {parallel.worker_count()} workers", "",
             "| layout | ingest s | prepare s | total s | images/s |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        work = Path(tmp)
        write_idx(work / "data" / "sources", images, labels, n_test=args.n // 7)
        write_folder(work / "images", images, labels)
        layouts = {
            "mnist (IDX .gz)": "data: {source: mnist, download: false}\n",
            "folder (one PNG per image)": "data: {source: folder, folder: images}\n",
        }
        for name, data_params in layouts.items():
            seconds = time_stages(work, data_params + prepare)
            total = sum(seconds.values())
            lines.append(
                f"| {name} | {seconds['ingest']:.1f} | {seconds['prepare']:.1f} | {total:.1f} | {args.n / total:,.0f} |"
            )
            print(lines[-1], flush=True)
    lines += ["", "Each stage is a fresh process: the figures include Python start-up, imports and MLflow logging."]
    report("Data benchmark", lines, "data")

if __name__ == "__main__":
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    main()
