"""Benchmark: the pipeline on a folder of real photos with the default params.

    python -m bench.photos                                   # ../shared/datasets/pets
    python -m bench.photos --folder PATH [--set train.epochs=5 ...]

Runs the real `dvc repro` in a temporary copy of the repository with only `data.source: folder`
and `data.folder` changed (plus any `--set key=value`), as a new user would, and reports what
the stages chose (stored size, input sizes, augmentation, channels), the test accuracy of both
models and each stage's time. Targets (issue 10, on the pets photos on this 2-core machine):
fine-tune >= 0.97, scratch >= 0.80, whole run <= 10 minutes. Results go to stdout and
bench/results/photos.md; nothing here is asserted in tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import folder_parser, parse_folder_args, parse_sets, report, set_params
from bench.pipeline import bench_env, copy_repo


def main() -> None:
    args = parse_folder_args(folder_parser(__doc__))
    import mlflow

    changes = {"data.source": "folder", "data.folder": str(args.folder.resolve())}
    changes.update(parse_sets(args.set))
    with tempfile.TemporaryDirectory(prefix="bench-photos-") as tmp:
        repo = Path(tmp)
        copy_repo(repo)
        set_params(repo, changes)
        env = bench_env(repo)
        mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments()  # the schema: not the pipeline's cost
        started = time.perf_counter()
        done = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True)
        total = time.perf_counter() - started
        if done.returncode:
            sys.exit(f"dvc repro failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
        acc = {m: json.loads((repo / f"dvclive/evaluate/{m}/metrics.json").read_text())["test"]["acc"]
               for m in ("scratch", "finetune")}
        prepared = json.loads((repo / "dvclive/prepare/metrics.json").read_text())
        cards = {m: json.loads((repo / f"models/{m}/model.json").read_text())["model_args"] for m in acc}
        client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
        runs = client.search_runs([client.get_experiment_by_name("cnn-pipeline").experiment_id],
                                  order_by=["start_time ASC"])
        tags = {r.info.run_name: r.data.tags for r in runs}
    lines = [
        f"- data: `{args.folder}`; params changed: {', '.join(f'`{k}={v}`' for k, v in changes.items())}",
        f"- stored at {prepared['image_size']} px, {prepared['colour']['channels']} channel(s); "
        f"scratch CNN at {cards['scratch']['input_size']} px (augment {tags['train'].get('augment')}), "
        f"fine-tune at {cards['finetune']['input_size']} px (augment {tags['finetune'].get('augment')})",
        f"- test accuracy: fine-tune **{acc['finetune']:.4f}** (target 0.97), scratch **{acc['scratch']:.4f}** "
        "(target 0.80)",
        f"- whole `dvc repro`: **{total / 60:.1f} min** (target: 10)",
        "",
        "| stage | in-process s |",
        "|---|---|",
        *(f"| {r.info.run_name} | {r.data.metrics.get('time/stage_seconds', float('nan')):.1f} |" for r in runs),
    ]
    report("Real photos, default params", lines, "photos")


if __name__ == "__main__":
    main()
