"""DVC's experiment queue as this project drives and watches it: starting it, reading its
status, finding its processes (`dvc exp queue-worker` nodes and the `dvc exp exec-run` each
experiment runs in), and waiting for named experiments to finish. The sweep, bench/queue.py
and the tests go through here; `queue_workers` (which workers are alive) is the part the
`runtime.threads: auto` share reads, so a stage depends on that module alone.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from pipeline.errors import PipelineError
from pipeline.experiments.queue_workers import cmdline, worker_node

DONE = ("Success", "Failed")


def dvc(*args: str, env: dict | None = None, cwd: Path | None = None) -> str:
    """`dvc <args>`'s stdout; a PipelineError with its last words when it fails."""
    done = subprocess.run(["dvc", *args], capture_output=True, text=True, env=env, cwd=cwd)
    if done.returncode:
        raise PipelineError(f"`dvc {' '.join(args)}` failed:\n{(done.stderr or done.stdout).strip()[-2000:]}")
    return done.stdout


def start(jobs: int, env: dict | None = None, cwd: Path | None = None) -> None:
    """`dvc queue start -j jobs`, returning at once: the workers it spawns inherit its stdout and
    stderr, so captured pipes would stay open (and this call wait) until the queue ran dry."""
    done = subprocess.run(["dvc", "queue", "start", "-j", str(jobs)], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if done.returncode:
        raise PipelineError(f"`dvc queue start -j {jobs}` failed (exit {done.returncode}); see `dvc queue status`")


def status(env: dict | None = None, cwd: Path | None = None) -> dict[str, str]:
    """Each queued experiment's state by name ('Queued', 'Running', 'Success', 'Failed')."""
    rows = dvc("queue", "status", env=env, cwd=cwd).splitlines()[1:]  # under the header: Task Name Created Status
    return {parts[1]: parts[-1] for parts in (r.split() for r in rows) if len(parts) >= 4}


def landed(cwd: Path | None = None) -> set[str]:
    """Names of the experiments DVC has saved (refs/exps/<baseline>/<name>): cheap to poll."""
    refs = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=cwd,
                          capture_output=True, text=True, check=True).stdout.split()
    return {ref.rsplit("/", 1)[-1] for ref in refs}


def workers_of(root: Path) -> list[psutil.Process]:
    """The live queue workers of the repository at `root` (their working directory)."""
    found = []
    for process in psutil.process_iter():
        try:
            if worker_node(process) and Path(process.cwd()) == root:
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


def wait_for_workers_without(name: str, value: str, root: Path, timeout: float = 90.0) -> None:
    """Block until no queue worker of the repository at `root` lacks `name`=`value` in its
    environment. A worker outlives its queue by 10 to 20 s (DVC gives dvc-task's idle monitor
    10 s), and one started before would take experiments queued now and run them without what
    the new caller's environment says (a sweep's study: its trials reported nothing to prune on)."""
    deadline = time.monotonic() + timeout
    while True:
        stale = []
        for process in workers_of(root):
            try:
                if process.environ().get(name) != value:
                    stale.append(process.pid)
            except (psutil.Error, OSError):
                continue
        if not stale:
            return
        if time.monotonic() > deadline:
            raise PipelineError(f"DVC queue workers {stale} of {root} are still running after {timeout:g} s; "
                                "stop them with `dvc queue stop` and rerun")
        time.sleep(1.0)


def experiments_running(root: Path) -> int:
    """`dvc exp exec-run` processes working for the queue of the repository at `root`."""
    running = (cmdline(p) for p in psutil.process_iter())
    return sum(1 for args in running if "exec-run" in args and any(str(root) in a for a in args))


def wait_for(names: list[str], root: Path, env: dict | None = None, jobs: int = 1, quiet_seconds: float = 12.0,
             timeout: float | None = None, requeue: Callable[[str], str] | None = None) -> dict[str, str]:
    """Block until the queue of the repository at `root` has run `names`; each one's 'Success'
    or 'Failed'. Polls git refs and the process table (cheap); asks `dvc queue status` only
    once no experiment has run for `quiet_seconds` (workers take the next task within seconds).

    Nothing here waits for ever on a queue that cannot move. A worker that has found the queue
    empty shuts itself down, and `dvc queue start` spawns no new one while it still answers:
    what was queued in that moment (a sweep's next batch) would wait with no worker, so when
    some of `names` are queued and the repository has no live worker, the queue is started
    again with `jobs` workers. One that DVC still calls running with no worker and no
    experiment process alive, twice `quiet_seconds` apart, had its worker die under it, or was
    lost by DVC's workers starting together (dvc#10673, dvc#10562): `dvc queue kill` marks it
    failed (DVC would call it running for ever) and, with `requeue`, it is queued once more
    under the name `requeue(name)` returns, with its params; the result is then that one's.
    One lost again counts as 'Failed'."""
    started = idle_since = time.monotonic()
    stalled = 0
    names, again = list(names), {}  # again: a lost experiment's name -> its requeued one's
    while True:
        time.sleep(1.0)
        live = [n for n in names if n not in again]  # a lost one never lands: its requeued one does
        if set(live) <= (done := landed(root)):
            return resolved(names, again, dict.fromkeys(done, "Success"))
        if experiments_running(root):
            idle_since, stalled = time.monotonic(), 0
        elif time.monotonic() - idle_since > quiet_seconds:
            now = status(env, root)
            if all(now.get(n) in DONE for n in names):
                return resolved(names, again, now)
            waiting = [n for n in names if now.get(n) not in DONE]
            if not workers_of(root):
                if any(now.get(n) == "Queued" for n in waiting):
                    warn(f"{', '.join(waiting)} queued with no worker left; `dvc queue start -j {jobs}` again")
                    start(jobs, env, root)
                    stalled = 0
                elif (stalled := stalled + 1) == 2:
                    shown = ", ".join(f"{n} ({now.get(n, 'gone')})" for n in waiting)
                    lost = [n for n in waiting if now.get(n) == "Running"]
                    for name in lost:  # DVC's own status says Running for ever: make it Failed
                        subprocess.run(["dvc", "queue", "kill", name], env=env, cwd=root, capture_output=True)
                    retry = [n for n in lost if requeue is not None and n not in again.values()]
                    if not retry:
                        warn(f"{shown} in `dvc queue status`, no worker or experiment of it alive: counted as failed")
                        return resolved(names, again, {**now, **dict.fromkeys(waiting, "Failed")})
                    for name in retry:
                        again[name] = requeue(name)
                        names.append(again[name])
                        warn(f"{name} was lost (Running in `dvc queue status`, no worker or experiment of it alive); "
                             f"queued again with the same params as {again[name]}")
                    start(jobs, env, root)
                    stalled = 0
            idle_since = time.monotonic()
        if timeout is not None and time.monotonic() - started > timeout:
            raise PipelineError(f"the DVC queue in {root} has not run {names} after {timeout:g} s: "
                                f"{status(env, root)}")


def resolved(names: list[str], again: dict[str, str], now: dict[str, str]) -> dict[str, str]:
    """Each name's result: a lost experiment's is its requeued one's (landed counts as Success)."""
    def result(name: str) -> str:
        return result(again[name]) if name in again else now.get(name, "Failed")

    return {n: result(n) for n in names if n not in again.values()}


def warn(message: str) -> None:
    print(f"dvc queue: {message}", file=sys.stderr, flush=True)
