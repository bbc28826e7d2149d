"""Benchmark: training on splits streamed from their memory map, against size and against resident.

    python -m bench.stream              # both (make bench)
    python -m bench.stream --steps 50   # fewer training steps a run

Synthetic train splits (uint8 32x32 RGB noise, written as .npy and opened with
`formats.load_split`, as the stages do) at two sizes, 8x apart on disk:

1. Memory: the train stage's model arguments (`train.channel_stats`) and a fixed number of
   `recipe.train_one_epoch` steps with the train params, streamed, while a thread samples
   anonymous memory (`RssAnon`: the heap, not the page cache that holds the mapped file). Its
   peak growth should stay flat while the data grows 8x; the resident path is shown beside it.
2. Throughput (images per second) of the same steps streamed and resident on the smaller split,
   measured side by side, alternating, in one run. The ratio is what counts; absolute figures
   depend on the machine. The file sits in the page cache here, so this measures the per-batch
   gather and conversion, not a disk: a split larger than memory also waits on reads.

Results go to stdout and to bench/results/stream.md; nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bench import REPO, report

SIDE, CHANNELS = 32, 3  # CIFAR-sized images: 3 KiB each
SIZES_GIB = (0.25, 2.0)


def rss_anon() -> int:
    """Anonymous resident memory in bytes; 0 where /proc/self/status lacks RssAnon."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


@contextlib.contextmanager
def peak_anon() -> Iterator[dict[str, int]]:
    """Samples RssAnon every millisecond in a thread; the dict gets 'before' and 'peak'."""
    gc.collect()  # the last phase's garbage is not this one's memory
    before = rss_anon()
    found = {"before": before, "peak": before}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            found["peak"] = max(found["peak"], rss_anon())
            done.wait(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield found
    finally:
        done.set()
        thread.join()
        found["peak"] = max(found["peak"], rss_anon())


def write_split(folder: Path, n: int, seed: int = 0) -> None:
    """A prepared folder with an n-image train split. Noise is drawn once (64 MiB) and written
    over and over with plain writes: seconds for gigabytes, and no memory for the whole."""
    from pipeline import files

    rng = np.random.default_rng(seed)
    block = rng.integers(0, 256, ((64 << 20) // (SIDE * SIDE * CHANNELS), SIDE, SIDE, CHANNELS), dtype=np.uint8)
    with open(folder / "train_images.npy", "wb") as f:
        header = {"descr": "|u1", "fortran_order": False, "shape": (n, SIDE, SIDE, CHANNELS)}
        np.lib.format.write_array_header_1_0(f, header)
        for start in range(0, n, len(block)):
            f.write(block[: min(len(block), n - start)])
    np.save(folder / "train_labels.npy", rng.integers(0, 10, n, dtype=np.int64))
    files.write_json(folder / "classes.json", [str(i) for i in range(10)])


@contextlib.contextmanager
def first_steps(steps: int) -> Iterator[None]:
    """Cut `recipe.train_one_epoch` short: its epoch yields only the first `steps` batches. The
    whole shuffled order is still drawn, so the per-image index memory is counted."""
    from pipeline.frameworks.torch import inputs

    full = inputs.batches
    inputs.batches = lambda n, batch_size, generator: itertools.islice(full(n, batch_size, generator), steps)
    try:
        yield
    finally:
        inputs.batches = full


@contextlib.contextmanager
def resident_limit(limit: int) -> Iterator[None]:
    from pipeline.frameworks.torch import inputs

    default = inputs.RESIDENT_BYTES
    inputs.RESIDENT_BYTES = limit
    try:
        yield
    finally:
        inputs.RESIDENT_BYTES = default


class Trainer:
    """The train stage's model and recipe on one split, run for a fixed number of steps."""

    def __init__(self, split, steps: int) -> None:
        from pipeline import config, train
        from pipeline.frameworks.interface import RuntimeParams
        from pipeline.frameworks.torch import runtime

        self.p = config.load("train", train.TrainParams, REPO / "params.yaml")
        rt = config.load("runtime", RuntimeParams, REPO / "params.yaml")
        self.device = runtime.configure(rt)
        self.threads, self.split, self.steps = rt.thread_count, split, steps
        started = time.perf_counter()
        self.model_args = train.model_args(self.p, split)  # streams the split through channel_stats
        self.stats_seconds = time.perf_counter() - started

    def images(self):
        from pipeline.frameworks.torch import inputs

        return inputs.Images(self.split.images, self.device, self.p.channels_last)

    def run(self, images) -> float:
        """Images per second over `steps` training steps from a fresh model."""
        import torch

        from pipeline.frameworks.torch import model as torch_model
        from pipeline.frameworks.torch import recipe

        torch.manual_seed(0)
        model = torch_model.ScratchCNN(**self.model_args)
        model.to(self.device, memory_format=torch.channels_last if self.p.channels_last else torch.preserve_format)
        optimizer = recipe.make_optimizer([q for q in model.parameters() if q.requires_grad], self.p)
        scheduler = recipe.make_scheduler(optimizer, self.p, self.steps)
        labels = torch.from_numpy(self.split.labels).to(self.device)
        generator = torch.Generator().manual_seed(0)
        started = time.perf_counter()
        with first_steps(self.steps):
            recipe.train_one_epoch(model, images, labels, optimizer, scheduler, self.p, self.device, generator)
        return self.steps * self.p.batch_size / (time.perf_counter() - started)


def bench(steps: int, repeats: int) -> list[str]:
    from pipeline.data import formats

    rows, trainers = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        for gib in SIZES_GIB:
            folder = Path(tmp) / f"{gib}GiB"
            folder.mkdir()
            n = int(gib * 2**30) // (SIDE * SIDE * CHANNELS)
            started = time.perf_counter()
            write_split(folder, n)
            written = time.perf_counter() - started
            split = formats.load_split(folder, "train")
            if not trainers:  # warm-up: lazy imports and first-call allocations are no one's data
                warm = Trainer(formats.Split(split.images[:4096], split.labels[:4096], split.classes), 5)
                warm.run(warm.images())
            with peak_anon() as stats_mem:
                trainer = Trainer(split, steps)
            with resident_limit(0), peak_anon() as train_mem:
                trainer.run(trainer.images())
            trainers[gib] = trainer
            rows.append((gib, n, written, trainer.stats_seconds, stats_mem, train_mem))

        small = trainers[SIZES_GIB[0]]
        with resident_limit(0):
            streamed = small.images()
        with resident_limit(1 << 62), peak_anon() as resident_mem:
            resident = small.images()  # fit() converts once per fit; not part of the step time
            small.run(resident)
        resident_bytes = resident.resident.nbytes
        runs = {"streamed": lambda: small.run(streamed), "resident": lambda: small.run(resident)}
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(repeats):  # alternate so that machine noise hits both alike
            for name, fn in runs.items():
                rates[name].append(fn())
        resident = None  # frees the float copy (the lambdas hold the variable, not the value)
    median = {name: statistics.median(v) for name, v in rates.items()}

    def mib(n: int) -> str:
        return f"{n / 2**20:,.0f}"

    p = small.p
    lines = [
        "## Peak anonymous memory, streamed", "",
        f"uint8 {SIDE}x{SIDE}x{CHANNELS} noise, train params from params.yaml (batch size {p.batch_size}, "
        f"shifts {p.augment_shift}, channels_last {p.channels_last}), {steps} `train_one_epoch` steps of the "
        f"train stage's ScratchCNN on {small.device}, {small.threads} threads. Growth is of the host's "
        "RssAnon over its level before each phase (after a warm-up run); the mapped file is page cache "
        "and does not count.", "",
        "| split on disk | images | as float | written in | channel_stats | peak growth: stats | "
        "peak growth: training | peak RssAnon |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for gib, n, written, stats_s, stats_mem, train_mem in rows:
        lines.append(
            f"| {gib:g} GiB | {n:,} | {gib * 4:g} GiB | {written:.1f} s | {stats_s:.1f} s | "
            f"{mib(stats_mem['peak'] - stats_mem['before'])} MiB | "
            f"{mib(train_mem['peak'] - train_mem['before'])} MiB | {mib(train_mem['peak'])} MiB |"
        )
    lines += [
        "", f"- what does grow with the split: its labels and each epoch's shuffled order, 16 bytes an image "
        f"({mib(16 * rows[-1][1])} MiB at {SIZES_GIB[-1]:g} GiB); the rest is the model's activations and "
        "optimizer state, and noise from the allocator",
        f"- the same steps resident on the {SIZES_GIB[0]:g} GiB split: peak growth "
        f"{mib(resident_mem['peak'] - resident_mem['before'])} MiB; the float copy ({mib(resident_bytes)} MiB) "
        f"lives on {small.device}, and a uint8 copy of the split is made while converting", "",
        "## Throughput, streamed against resident", "",
        f"{SIZES_GIB[0]:g} GiB split, {steps} steps a run, median of {repeats} alternating runs each.", "",
        "| path | images/s |", "|---|---|",
        *[f"| {name} | {rate:.0f} |" for name, rate in median.items()], "",
        f"- ratio streamed / resident: **{median['streamed'] / median['resident']:.2f}**", "",
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="training steps a run")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    report("Streaming benchmark", bench(args.steps, args.repeats), "stream")


if __name__ == "__main__":
    main()
