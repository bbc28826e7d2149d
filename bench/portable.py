"""Benchmark: what `runtime.portable: true` costs, train and fine-tune, against this CPU's fastest paths.

    python -m bench.portable [--repeats 2] [--stages train finetune]   # needs data/prepared

Each measurement is the real stage (`python -m pipeline <stage>`, a fresh process as DVC runs
it) on the prepared split with params.yaml's params, `runtime.portable` true or false; the
two modes alternate so that machine noise hits both alike. Reported per stage and mode: the
median training images per second (the stage's own `time/images_per_second`, fit time only),
the ISA path ATen took, and whether the repeats of a mode wrote the same weights; then the
portable / fastest ratio (target >= 0.9). Results go to stdout and bench/results/portable.md.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import REPO, report

MODELS = {"train": "scratch", "finetune": "finetune"}


def run_stage(stage: str, portable: bool, work: Path) -> dict:
    """One run of `stage` in `work`; its throughput, ATen's path and the weights' hash."""
    work.mkdir(parents=True)
    params = (REPO / "params.yaml").read_text()
    params = re.sub(r"(?m)^(  portable:) \w+", rf"\1 {str(portable).lower()}", params, count=1)
    (work / "params.yaml").write_text(params)
    uri = f"sqlite:///{work / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": uri}
    out = work / "models" / MODELS[stage]
    cmd = [sys.executable, "-m", "pipeline", stage, "--data", str(REPO / "data/prepared"), "--out", str(out),
           "--live", str(work / "live")]
    done = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{stage} failed:\n{done.stderr[-3000:]}")
    import mlflow

    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("cnn-pipeline")
    (found,) = client.search_runs([experiment.experiment_id], f"tags.stage = '{stage}'", max_results=1)
    weights = hashlib.sha256((out / "model.pt").read_bytes()).hexdigest()[:16]
    return {"images_per_second": found.data.metrics["time/images_per_second"],
            "aten": found.data.tags.get("aten_cpu_capability", "?"), "weights": weights}


def bench(stages: list[str], repeats: int) -> list[str]:
    lines = ["| stage | mode | images/s (median) | ATen path | repeats identical | weights |",
             "|---|---|---|---|---|---|"]
    ratios = []
    with tempfile.TemporaryDirectory(prefix="bench-portable-") as tmp:
        for stage in stages:
            results: dict[bool, list[dict]] = {True: [], False: []}
            for i in range(repeats):
                for portable in (True, False):
                    results[portable].append(run_stage(stage, portable, Path(tmp) / f"{stage}-{portable}-{i}"))
            median = {m: statistics.median(r["images_per_second"] for r in rs) for m, rs in results.items()}
            for portable in (True, False):
                rs = results[portable]
                same = len({r["weights"] for r in rs}) == 1
                mode = "portable" if portable else "fastest"
                lines.append(f"| {stage} | {mode} | {median[portable]:,.0f} | {rs[0]['aten']} | {same} "
                             f"| {rs[0]['weights']} |")
            ratios.append(f"- **{stage}: portable / fastest throughput {median[True] / median[False]:.2f}x** "
                          "(target >= 0.9x)")
    return [*lines, "", *ratios]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--stages", nargs="+", choices=list(MODELS), default=list(MODELS))
    args = parser.parse_args()
    report("Portable determinism: its cost", bench(args.stages, args.repeats), "portable")


if __name__ == "__main__":
    main()
