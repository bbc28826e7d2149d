"""Benchmark: experiments through DVC's queue, `dvc queue start -j 1` beside `-j 2`.

    python -m bench.queue                  # 4 experiments each way (make bench)
    python -m bench.queue --experiments 2

In a temporary copy of the repository with the default params and `runtime.threads: auto`
(early stopping off, so every experiment does the same work), one `dvc repro` makes the
baseline; then N experiments, each a different `train.seed` (rerunning train, crossval,
evaluate, export, register and report), run through the queue with `-j 1`, and N more with `-j 2`.
Work per second is experiments finished over the wall time from `dvc queue start` until the
last one's process exits; the train stage's images/s come from its MLflow runs. Target:
`-j 2` at least 0.9x the work per second of `-j 1`.

Checked on the way, not timed: every experiment succeeded and appears once in `dvc exp show`;
each rerun stage has exactly one MLflow run per experiment in the root store; the thread
count `auto` chose is in each run's tags.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import report
from bench.pipeline import bench_env, copy_repo
from pipeline.experiments import dvc_queue

# what a train.seed change reruns (crossval reads the train params too)
RERUN = ("train", "crossval", "evaluate@scratch", "export@scratch", "register", "report")


def sh(cmd: list[str], repo: Path) -> str:
    done = subprocess.run(cmd, cwd=repo, env=bench_env(repo), capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(cmd)} failed in {repo}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def run_queue(repo: Path, seeds: list[int], jobs: int) -> float:
    """Queue one experiment per seed, run them with `-j jobs`; the wall seconds until all have landed."""
    names = [f"j{jobs}-seed{seed}" for seed in seeds]
    for name, seed in zip(names, seeds, strict=True):
        sh(["dvc", "exp", "run", "--queue", "-q", "-n", name, "-S", f"train.seed={seed}"], repo)
    started = time.perf_counter()
    dvc_queue.start(jobs, bench_env(repo), cwd=repo)
    dvc_queue.wait_for(names, repo, bench_env(repo), jobs)  # polls each second; a failure shows in the checks below
    return time.perf_counter() - started


def results(repo: Path) -> tuple[dict, list]:
    import mlflow

    status = sh(["dvc", "queue", "status"], repo)
    shown = json.loads(sh(["dvc", "exp", "show", "--json"], repo))
    names = collections.Counter(exp.get("name") for base in shown for exp in base.get("experiments") or [])
    client = mlflow.MlflowClient(bench_env(repo)["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("cnn-pipeline")
    runs = client.search_runs([experiment.experiment_id], "tags.stage LIKE '%'", max_results=5000)
    return {"status": status, "names": names}, runs


def bench_queue(n: int) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="bench-queue-") as tmp:
        repo = Path(tmp)
        copy_repo(repo)
        params = (repo / "params.yaml").read_text()
        params = params.replace("  threads: 2 ", "  threads: auto ", 1)
        params = params.replace("  portable: true ", "  portable: false ", 1)  # auto follows the cores
        params = re.sub(r"(?m)^(  early_stopping_patience:) 10", r"\1 0", params, count=1)
        (repo / "params.yaml").write_text(params)
        sh(["dvc", "repro", "-q"], repo)
        sh(["git", "add", "-A"], repo)
        sh(["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "baseline"], repo)
        walls = {1: run_queue(repo, list(range(1, n + 1)), 1), 2: run_queue(repo, list(range(n + 1, 2 * n + 1)), 2)}
        checks, runs = results(repo)
    return lines_for(n, walls, checks, runs)


def lines_for(n: int, walls: dict[int, float], checks: dict, runs: list) -> list[str]:
    by_exp: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    train: dict[int, list] = collections.defaultdict(list)
    for r in runs:
        name = r.data.tags.get("dvc_exp_name", "")
        if name.startswith("j"):
            by_exp[name][r.data.tags["stage"]] += 1
            if r.data.tags["stage"] == "train":
                train[int(name[1])].append(r)
    once = all(by_exp[name] == collections.Counter(RERUN) for name in by_exp)
    failed = re.findall(r"\b(Failed|Queued|Running)\b", checks["status"])
    lines = ["## Queued experiments, `-j 1` beside `-j 2`", "",
             f"{n} experiments each way (train.seed changed: train, crossval, evaluate, export, register and report "
             "rerun); default params, `runtime.threads: auto`, early stopping off.", "",
             "| queue | wall s | experiments/min | train fit s (median) | train images/s (sum over runs in flight) "
             "| threads per stage |", "|---|---|---|---|---|---|"]
    rate = {}
    for jobs in (1, 2):
        fits = sorted(float(r.data.metrics.get("time/fit_seconds", 0)) for r in train[jobs])
        ips = sorted(float(r.data.metrics.get("time/images_per_second", 0)) for r in train[jobs])
        threads = sorted({r.data.tags.get("threads", "?") for r in train[jobs]})
        rate[jobs] = n / walls[jobs] * 60
        fit = fits[len(fits) // 2] if fits else float("nan")
        per = ips[len(ips) // 2] * jobs if ips else float("nan")
        row = [f"-j {jobs}", f"{walls[jobs]:.1f}", f"{rate[jobs]:.2f}", f"{fit:.1f}", f"{per:,.0f}", ", ".join(threads)]
        lines.append(f"| {' | '.join(row)} |")
    lines += ["", f"**-j 2 / -j 1 work per second: {rate[2] / rate[1]:.2f}x** (target >= 0.9x)", "",
              f"- experiments in `dvc exp show`: {len(checks['names'])} ({2 * n} expected), "
              f"each once: {all(c == 1 for c in checks['names'].values())}",
              f"- MLflow: {sum(sum(c.values()) for c in by_exp.values())} stage runs for {len(by_exp)} experiments, "
              f"exactly one per rerun stage each: {once}",
              f"- queue tasks not succeeded: {len(failed)}"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", type=int, default=4)
    args = parser.parse_args()
    report("Queued experiments", bench_queue(args.experiments), "queue")


if __name__ == "__main__":
    main()
