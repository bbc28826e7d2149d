"""Which DVC queue workers are alive, read from the process table: the `runtime.threads: auto`
share (`cpu_share`) divides the cores among a queue's live workers, and the queue driver
(`dvc_queue`) finds them too. Kept apart from the driver, so that only this code, which shapes
a stage's thread count, is a stage's dependency.
"""

from __future__ import annotations

import re

import psutil

WORKER = re.compile(r"^(dvc-exp-[0-9a-f]+)-\d+@")  # a queue worker's celery node name: one hash per repository


def cmdline(process: psutil.Process) -> list[str]:
    """The process's arguments; none for one that has gone or that this user may not read."""
    try:
        return process.cmdline()
    except (psutil.Error, OSError):
        return []


def worker_node(process: psutil.Process) -> str | None:
    """`dvc-exp-<hash>` when `process` is a DVC queue worker, else None."""
    args = cmdline(process)
    if "queue-worker" not in args:
        return None
    return next((m.group(1) for m in map(WORKER.match, args) if m), None)


def workers_around(pid: int | None = None) -> int:
    """How many workers of the queue that runs process `pid` (this one by default) are alive;
    0 outside a queue."""
    try:
        ancestors = psutil.Process(pid).parents()
    except psutil.Error:
        return 0
    node = next((n for n in map(worker_node, ancestors) if n), None)
    if node is None:
        return 0
    return sum(1 for p in psutil.process_iter() if worker_node(p) == node)
