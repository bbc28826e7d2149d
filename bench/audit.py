"""Benchmark: the audit stage finds planted label flips and outliers in a real photo folder.

    python -m bench.audit                          # ../shared/datasets/pets, 5% flipped, 10 outliers
    python -m bench.audit --subset 200 --seed 7    # 100 photos a class
    python -m bench.audit --folder PATH --flip 0.05
    python -m bench.audit --set audit.input_size=160

Copies the folder with a seeded `flip` share of its images moved to another class's folder
and `outliers` images from other domains added (bundled digits blown up to photo size, and
solid colours), runs `dvc repro audit` (ingest, prepare, audit) in a temporary copy of the
repository with only `data.source`/`data.folder` changed, and reports the recall of the
planted flips among the flagged label issues and the precision (which counts only planted
flips: real label errors of the source lower it), the planted outliers found, and the audit's
own time. Galleries go to bench/results/audit/ to look at; nothing here is asserted in tests.
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import REPO, folder_parser, parse_folder_args, parse_sets, report, set_params
from bench.pipeline import bench_env, copy_repo


def plant(source: Path, dest: Path, flip: float, outliers: int, seed: int, subset: int = 0) -> tuple[set, set]:
    """`dest`: `source`'s class folders with a `flip` share of images moved to another class,
    plus `outliers` images from other domains; returns (flipped paths, outlier paths) as the
    manifest names them (class/file)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    rng = np.random.default_rng(seed)
    classes = sorted(p.name for p in source.iterdir() if p.is_dir())
    files = {c: sorted(p for p in (source / c).iterdir() if p.is_file()) for c in classes}
    if subset:
        files = {c: sorted(rng.choice(f, subset // len(classes), replace=False).tolist()) for c, f in files.items()}
    everything = [(c, f) for c in classes for f in files[c]]
    chosen = set(rng.choice(len(everything), round(flip * len(everything)), replace=False).tolist())
    flipped, planted = set(), set()
    for i, (c, f) in enumerate(everything):
        to = c if i not in chosen else classes[(classes.index(c) + 1 + rng.integers(len(classes) - 1)) % len(classes)]
        (dest / to).mkdir(parents=True, exist_ok=True)
        name = f"{c}_{f.name}"  # unique across classes
        shutil.copy(f, dest / to / name)
        if to != c:
            flipped.add(f"{to}/{name}")
    digits = load_digits().images
    side = Image.open(everything[0][1]).size
    for k in range(outliers):
        c = classes[k % len(classes)]
        if k % 2 == 0:
            pixels = (digits[rng.integers(len(digits))] * 255 / 16).astype(np.uint8)
            image = Image.fromarray(pixels).resize(side, Image.Resampling.NEAREST).convert("RGB")
        else:
            image = Image.new("RGB", side, tuple(int(v) for v in rng.integers(0, 256, 3)))
        image.save(dest / c / f"outlier_{k}.png")
        planted.add(f"{c}/outlier_{k}.png")
    return flipped, planted


def score(issues: list[dict], flipped: set, planted: set) -> dict[str, float]:
    labelled = {r["path"] for r in issues if r["kind"] == "label_issue"}
    hits = labelled & flipped
    found_outliers = {r["path"] for r in issues if r["kind"] != "label_issue"} & planted
    return {"planted_flips": len(flipped), "flagged_label_issues": len(labelled), "found": len(hits),
            "recall": len(hits) / max(len(flipped), 1), "precision": len(hits) / max(len(labelled), 1),
            "planted_outliers": len(planted), "outliers_found": len(found_outliers),
            "unplanted": sorted(labelled - flipped)}


def main() -> None:
    parser = folder_parser(__doc__)
    parser.add_argument("--flip", type=float, default=0.05)
    parser.add_argument("--outliers", type=int, default=10)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--subset", type=int, default=0, help="images in all, split evenly among classes")
    args = parse_folder_args(parser)
    import mlflow

    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        repo, photos = Path(tmp) / "repo", Path(tmp) / "photos"
        repo.mkdir()
        flipped, planted = plant(args.folder, photos, args.flip, args.outliers, args.seed, args.subset)
        copy_repo(repo)
        set_params(repo, {"data.source": "folder", "data.folder": str(photos), **parse_sets(args.set)})
        env = bench_env(repo)
        mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments()
        started = time.perf_counter()
        done = subprocess.run(["dvc", "repro", "audit"], cwd=repo, env=env, capture_output=True, text=True)
        total = time.perf_counter() - started
        if done.returncode:
            sys.exit(f"dvc repro audit failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")
        with (repo / "data/audit/issues.csv").open() as handle:
            issues = list(csv.DictReader(handle))
        metrics = json.loads((repo / "dvclive/audit/metrics.json").read_text())
        client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
        experiment = client.get_experiment_by_name("cnn-pipeline").experiment_id
        run = client.search_runs([experiment], "tags.stage = 'audit'")[0]
        out = REPO / "bench" / "results" / "audit"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(repo / "reports" / "audit", out)
        shutil.copy(repo / "reports" / "audit.md", out / "audit.md")
        for name in ("features.npy", "issues.csv"):  # to try other thresholds on without a rerun
            shutil.copy(repo / "data" / "audit" / name, out / name)
        shutil.copy(repo / "data" / "prepared" / "manifest.csv", out / "manifest.csv")
        (out / "planted.json").write_text(json.dumps({"flipped": sorted(flipped), "outliers": sorted(planted)}))
    s = score(issues, flipped, planted)
    timing = {k.removeprefix("time/"): v for k, v in run.data.metrics.items() if k.startswith("time/")}
    lines = [
        f"- data: `{args.folder}`{f' ({args.subset} images)' if args.subset else ''}, seed {args.seed}: "
        f"{s['planted_flips']} labels flipped ({args.flip:.0%}), {s['planted_outliers']} outliers added "
        f"({metrics['images']} images in all)",
        f"- label issues flagged: {s['flagged_label_issues']}; planted flips among them: {s['found']}: "
        f"recall **{s['recall']:.3f}** (target 0.9), precision **{s['precision']:.3f}** (target 0.7)",
        f"- planted outliers flagged (as outlier or poor image): **{s['outliers_found']} of "
        f"{s['planted_outliers']}**; "
        f"outliers flagged in all: {metrics['issues']['outlier']}",
        f"- estimated noise rate {metrics['estimated_noise_rate']:.3f}; probe out-of-fold accuracy "
        f"{metrics['probe_out_of_fold_acc']:.4f}",
        "- audit stage: " + ", ".join(f"{k} {v:.1f} s" for k, v in sorted(timing.items()))
        + f"; `dvc repro audit` with ingest and prepare {total:.0f} s",
        "- flagged but not planted (look at them: real label errors or model mistakes): "
        + ", ".join(s["unplanted"][:40]),
    ]
    report("Audit: planted label flips and outliers", lines, "audit")


if __name__ == "__main__":
    main()
