"""How many CPU threads a stage may use when `runtime.threads: auto`.

`dvc queue start -j N` runs N experiments at once, each in its own worker process
(`dvc exp queue-worker dvc-exp-<repo hash>-<k>@localhost`). Each stage pinning every core
oversubscribes them: measured here, two concurrent 2-thread torch jobs ran at 335 images/s
each against 4,200 each with one thread. `auto` gives each of the queue's live workers an
equal share of the cores this process may run on (its affinity set, which `taskset` and
container CPU sets narrow), and every core to a stage outside a queue.

The count changes the order in which floats are summed, so it is part of a run's
reproducibility record (an MLflow tag of every stage); a fixed number in params.yaml keeps
results independent of how many experiments run beside it.
"""

from __future__ import annotations

import os

from pipeline.experiments import queue_workers
from pipeline.runtime import launch


def available_cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity sets
        return os.cpu_count() or 1


def auto_threads(cores: int | None = None, workers: int | None = None, ranks: int | None = None) -> int:
    """The cores divided among the queue's workers (all of them outside a queue) and among the
    stage's own torchrun processes on this machine, at least 1."""
    cores = available_cores() if cores is None else cores
    workers = queue_workers.workers_around() if workers is None else workers
    ranks = launch.local_processes() if ranks is None else ranks
    return max(1, cores // (max(1, workers) * max(1, ranks)))
