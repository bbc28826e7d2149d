"""`python -m pipeline.experiments.batch -j 2 -S 'train.lr=1e-3,3e-3,1e-2' [-S key=value ...] [--name lr] [stage ...]`:
many experiments through DVC's queue, every one accounted for.

The `-S` values make a grid (a comma-separated list varies, as `dvc exp run --queue -S` does);
each point is queued as `dvc exp run --queue -n <name>-<i> -S key=value ...`, the queue started
with `-j` workers and watched until every experiment has landed or failed
(`dvc_queue.wait_for`). DVC's queue can lose an experiment when its workers start together
(dvc#10673, dvc#10562): it stays 'Running' in `dvc queue status`, with no worker or experiment
process behind it and no logs. Such an experiment is found, marked failed in DVC's queue
(`dvc queue kill`) and queued once more with the same params as `<name>-again`, and the
user is told; one lost twice counts as failed. Ends with a line per experiment (its params
and Success or Failed, with the `dvc queue logs` command for a failure); exit code 1 when any
failed.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.experiments import dvc_queue


def grid(sets: list[str]) -> list[tuple[str, ...]]:
    """Every combination of the `key=v1,v2,...` values, as `key=value` overrides."""
    axes = []
    for given in sets:
        key, sep, values = given.partition("=")
        if not sep or not key:
            raise PipelineError(f"-S {given!r}: expected key=value or key=v1,v2,... (e.g. train.lr=1e-3,3e-3)")
        listed = [values] if values.startswith("[") else values.split(",")
        axes.append([f"{key}={v}" for v in listed])
    return list(itertools.product(*axes)) if axes else [()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help="stages to run (default: the whole pipeline)")
    parser.add_argument("-S", "--set-param", dest="sets", action="append", default=[], metavar="KEY=VALUES")
    parser.add_argument("-j", "--jobs", type=int, default=1, help="experiments at once (dvc queue start -j)")
    parser.add_argument("--name", default=time.strftime("batch-%m%d-%H%M%S"), help="experiments are <name>-1, ...")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("-j must be at least 1")
    root = Path.cwd()
    try:
        points = grid(args.sets)
        params: dict[str, tuple[str, ...]] = {}

        def queue(name: str, overrides: tuple[str, ...]) -> str:
            dvc_queue.dvc("exp", "run", "--queue", "-n", name,
                          *[a for o in overrides for a in ("-S", o)], *args.targets)
            params[name] = overrides
            return name

        names = [queue(f"{args.name}-{i}", point) for i, point in enumerate(points, 1)]
        print(f"batch: {len(names)} experiment(s) queued, {args.jobs} at a time", file=sys.stderr, flush=True)
        dvc_queue.start(args.jobs)
        results = dvc_queue.wait_for(names, root, jobs=args.jobs,
                                     requeue=lambda lost: queue(f"{lost}-again", params[lost]))
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name in names:
        shown = " ".join(params[name]) or "(no params changed)"
        ran = f"{name}-again" if f"{name}-again" in params else name  # requeued: the result is that one's
        hint = f"  (`dvc queue logs {ran}`)" if results[name] != "Success" else ""
        print(f"{name}  {shown}  {results[name]}{hint}")
    return 0 if all(r == "Success" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
