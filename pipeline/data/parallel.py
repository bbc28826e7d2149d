"""Process pools for per-image work that must survive a crashing native decoder.

Decoding runs in worker processes: Python-level errors come back as results, and a worker
that dies outright (a native decoder's abort or segfault) costs only the image that killed
it. The broken batch is rerun piece by piece, each piece alone in a fresh pool, until the
culprit is found; it is reported through `crashed(item)` and everything else completes.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def worker_count() -> int:
    """Every core this process may use; PIPELINE_WORKERS overrides (outputs never depend on it)."""
    if os.environ.get("PIPELINE_WORKERS"):
        return max(1, int(os.environ["PIPELINE_WORKERS"]))
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _context() -> multiprocessing.context.BaseContext:
    # fork shares the parent's loaded dataset with the workers for free (copy on write);
    # elsewhere (macOS, Windows) the initializer's arguments are pickled to each worker.
    return multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")


def map_batches(
    fn: Callable[[Sequence[T]], list[R]],
    items: Sequence[T],
    crashed: Callable[[T], R],
    workers: int,
    max_batch: int,
    initializer: Callable[..., None] | None = None,
    initargs: tuple[Any, ...] = (),
) -> list[R]:
    """[r for batch in batches(items) for r in fn(batch)], in item order, across processes.

    About eight batches a worker (at most `max_batch` items each, at least 16) balance the load
    and keep the pickling per call small; the results do not depend on the batching."""
    batch_size = max(16, min(max_batch, len(items) // (workers * 8) + 1))
    results: list[Any] = [None] * len(items)
    spans = [(a, min(a + batch_size, len(items))) for a in range(0, len(items), batch_size)]

    def run(spans: list[tuple[int, int]], processes: int) -> list[tuple[int, int]]:
        broken = []
        with ProcessPoolExecutor(processes, mp_context=_context(), initializer=initializer, initargs=initargs) as pool:
            futures = [(span, pool.submit(fn, items[span[0] : span[1]])) for span in spans]
            for (a, b), future in futures:
                try:
                    results[a:b] = future.result()
                except BrokenProcessPool:
                    broken.append((a, b))  # the culprit's batch, or collateral of its pool
        return broken

    suspects = run(spans, max(1, min(workers, len(spans)))) if spans else []
    while suspects:  # alone in its own pool, a batch that breaks holds a culprit
        a, b = suspects.pop(0)
        if not run([(a, b)], 1):
            continue
        if b - a == 1:
            results[a] = crashed(items[a])
        else:
            middle = (a + b) // 2
            suspects[:0] = [(a, middle), (middle, b)]
    return results
