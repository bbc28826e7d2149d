"""Benchmark: what verifying a folder's SHA256SUMS costs, against reading the folder.

    python -m bench.integrity [--mb 512] [--repeats 3]

Every stage that reads a prepared split or a model folder first checks each file against the
SHA256SUMS written with it (`files.verify_folder`). Here, side by side on one folder of
`--mb` megabytes of .npy splits (the pets photos stored at 180 px are 194 MB; MNIST 55 MB),
alternated, medians: the verification, and reading the same files whole with np.load (what a
resident training split costs anyway). Results go to stdout and bench/results/integrity.md;
nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from pipeline import files

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="bench-integrity-") as tmp:
        folder = Path(tmp) / "prepared"
        with files.atomic_dir(folder) as out:
            for split, share in (("train", 0.7), ("val", 0.15), ("test", 0.15)):
                n = int(args.mb * share * 2**20) // (180 * 180 * 3)
                np.save(out / f"{split}_images.npy", rng.integers(0, 256, (n, 180, 180, 3), dtype=np.uint8))
        npys = sorted(folder.glob("*.npy"))
        size = sum(p.stat().st_size for p in npys)
        verify, load = [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            files.verify_folder(folder, "prepare")
            verify.append(time.perf_counter() - started)
            started = time.perf_counter()
            for path in npys:
                np.load(path).sum(dtype=np.uint64)  # touch every byte, as converting to floats does
            load.append(time.perf_counter() - started)
    v, r = statistics.median(verify), statistics.median(load)
    lines = [
        f"- folder: {size / 2**20:.0f} MB of uint8 splits (page cache warm), medians of {args.repeats}",
        "",
        "| | s | MB/s |",
        "|---|---|---|",
        f"| verify SHA256SUMS | {v:.2f} | {size / 2**20 / v:.0f} |",
        f"| read the same files whole (np.load and sum) | {r:.2f} | {size / 2**20 / r:.0f} |",
        "",
        f"- verify / read: **{v / r:.2f}**",
    ]
    report("Integrity check cost", lines, "integrity")


if __name__ == "__main__":
    main()
