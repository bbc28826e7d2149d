"""Benchmark: DVC's queue with `-j 2`, round after round, through `python -m pipeline.experiments.batch`.

    python -m bench.batch --rounds 5

In a temporary copy of the repository (the digits, `dvc repro prepare` once), each round queues
six experiments of the train stage (2 epochs, each its own seed) with `-j 2` and counts how
many landed, how many DVC's queue lost (the batch's `... was lost` lines: queued again once)
and how many failed. The issue this answers saw one experiment of ten lost with the plain
`dvc queue start -j 2`. Results go to stdout and bench/results/batch.md; nothing is asserted.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import report, set_params
from bench.pipeline import bench_env, copy_repo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--experiments", type=int, default=6)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        repo = Path(tmp)
        copy_repo(repo)
        set_params(repo, {"train.epochs": "2"})
        env = bench_env(repo)
        for cmd in (["dvc", "repro", "prepare"], ["git", "add", "-A"], ["git", "commit", "-qm", "prepared"]):
            subprocess.run(cmd, cwd=repo, env=env, check=True, capture_output=True)
        for round_ in range(1, args.rounds + 1):
            seeds = ",".join(str(100 * round_ + i) for i in range(args.experiments))
            started = time.perf_counter()
            done = subprocess.run([sys.executable, "-m", "pipeline.experiments.batch", "-j", "2", "--name",
                                   f"round{round_}", "-S", f"train.seed={seeds}", "train"],
                                  cwd=repo, env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - started
            lines = done.stdout.splitlines()
            rows.append((round_, sum(line.endswith("Success") for line in lines),
                         done.stderr.count(" was lost "), sum("Failed" in line for line in lines), seconds))
            print(rows[-1], flush=True)
    report("DVC's queue, round after round", [
        f"{args.rounds} rounds of {args.experiments} experiments (the train stage, 2 epochs) with "
        "`python -m pipeline.experiments.batch -j 2`", "",
        "| round | landed | lost by DVC's queue, queued again | failed | seconds |", "|---|---|---|---|---|",
        *[f"| {r} | {ok} | {lost} | {failed} | {s:.0f} |" for r, ok, lost, failed, s in rows], "",
    ], "batch")


if __name__ == "__main__":
    main()
