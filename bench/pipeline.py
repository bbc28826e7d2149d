"""Benchmarks: whole-pipeline wall time and the train stage's throughput against a bare loop.

    python -m bench.pipeline             # both (make bench)
    python -m bench.pipeline --no-repro  # throughput only
    python -m bench.pipeline --against 8232335 --no-throughput  # this tree's repro beside a commit's

1. `dvc repro -f` of the real dvc.yaml and params.yaml in a temporary copy of the repository,
   timed end to end, with each stage's in-process time from MLflow beside it (the difference
   is process start-up: imports of torch, MLflow, DVCLive). With `--against REV`, the same
   run of that git revision's pipeline in a second copy, alternated with this tree's
   `--repeats-repro` times, so that "no slower than REV" is a ratio measured side by side.
2. Training throughput (images per second) of `recipe.train_one_epoch` with the train
   stage's params against a bare PyTorch loop (forward, loss, backward, optimizer step) over the
   same in-memory tensors and the same model, measured side by side, alternating, in one run.
   The ratio is what counts; absolute figures depend on the machine.

Results go to stdout and to bench/results/latest.md; nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import REPO, report


def pipeline_file(rel: str) -> bool:
    """What a copy of the pipeline needs: its code, DVC's files and the bundled sources."""
    return rel.startswith(("pipeline/", ".dvc/", "data/sources/")) or rel in {
        "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore",
    }


def copy_repo(dest: Path, rev: str | None = None) -> None:
    """The pipeline's files (of the working tree, or of git revision `rev`) in a new git repo."""
    if rev is None:
        listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
        for rel in filter(pipeline_file, listed.stdout.split()):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / rel, dest / rel)
    else:
        archive = subprocess.run(["git", "archive", rev], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        for path in [p for p in dest.rglob("*") if p.is_file()]:
            if not pipeline_file(str(path.relative_to(dest))):
                path.unlink()
    env = bench_env(dest)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench"],
    ):
        subprocess.run(cmd, cwd=dest, env=env, check=True, capture_output=True)


def bench_env(repo: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{repo / 'mlflow.db'}"
    return env


def repro(repo: Path) -> tuple[float, list]:
    """Seconds of `dvc repro -f` in `repo`, and its MLflow runs (stage times)."""
    import mlflow

    env = bench_env(repo)
    # Create the MLflow schema first: a one-off cost, not the pipeline's.
    mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments()
    started = time.perf_counter()
    done = subprocess.run(["dvc", "repro", "-f"], cwd=repo, env=env, capture_output=True, text=True)
    total = time.perf_counter() - started
    if done.returncode:
        sys.exit(f"dvc repro failed in {repo}:\n{done.stdout}\n{done.stderr}")
    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name("cnn-pipeline").experiment_id], "tags.stage LIKE '%'",
                              order_by=["start_time DESC"], max_results=len(stage_names(repo)) - 1)  # no run: sync
    return total, runs[::-1]


def sync_costs(repo: Path) -> list[str]:
    """Seconds of the sync stage's work: with nothing missing (alone, and the whole no-op `dvc
    repro` around it), and rebuilding every stage's run into an empty store."""
    env = bench_env(repo)

    def timed(cmd: list[str]) -> float:
        started = time.perf_counter()
        subprocess.run(cmd, cwd=repo, env=env, capture_output=True, check=True)
        return time.perf_counter() - started

    nothing = min(timed([sys.executable, "-m", "pipeline", "sync"]) for _ in range(3))
    noop = min(timed(["dvc", "repro"]) for _ in range(3))
    (repo / "mlflow.db").unlink()
    rebuild = timed([sys.executable, "-m", "pipeline", "sync"])
    return [f"- `python -m pipeline sync` with nothing missing: **{nothing:.2f} s** (target: under 2 s); a no-op "
            f"`dvc repro` around it: {noop:.2f} s; every stage's run rebuilt into an empty store: {rebuild:.1f} s", ""]


def stage_names(repo: Path) -> list[str]:
    done = subprocess.run(["dvc", "stage", "list", "--name-only"], cwd=repo, env=bench_env(repo),
                          capture_output=True, text=True, check=True)
    return done.stdout.split()


def bench_repro(against: str | None = None, repeats: int = 1) -> list[str]:
    lines = ["## `dvc repro -f` on the default params", ""]
    with tempfile.TemporaryDirectory(prefix="bench-repro-") as tmp:
        ours, theirs = Path(tmp) / "tree", Path(tmp) / "rev"
        ours.mkdir()
        copy_repo(ours)
        if against:
            theirs.mkdir()
            copy_repo(theirs, against)
        times: dict[str, list[float]] = {"tree": [], "rev": []}
        for _ in range(repeats):
            total, runs = repro(ours)
            times["tree"].append(total)
            if against:
                times["rev"].append(repro(theirs)[0])
        total = statistics.median(times["tree"])
        lines += [f"- whole `dvc repro -f`: **{total:.0f} s** (median of {repeats}; target: under 180 s, aim 90 s)"]
        if against:
            rev = statistics.median(times["rev"])
            lines += [f"- the same on `{against}`, alternated with it: {rev:.0f} s; this tree / `{against}`: "
                      f"**{total / rev:.2f}** (runs: {', '.join(f'{t:.0f}' for t in times['tree'])} s against "
                      f"{', '.join(f'{t:.0f}' for t in times['rev'])} s)"]
        lines += ["", "| stage (this tree's last run) | in-process s |", "|---|---|"]
        for r in runs:
            lines.append(f"| {r.info.run_name} | {r.data.metrics.get('time/stage_seconds', float('nan')):.1f} |")
        staged = sum(r.data.metrics.get("time/stage_seconds", 0.0) for r in runs)
        lines += ["", f"- in-process total {staged:.0f} s; the other {runs and times['tree'][-1] - staged:.0f} s are "
                  "DVC itself and process start-up (each stage is a new Python importing torch, MLflow and DVCLive)",
                  ""]
        lines += sync_costs(ours)
    return lines


def bench_throughput(repeats: int) -> list[str]:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from pipeline import config, prepare, train
    from pipeline.data import formats
    from pipeline.frameworks.interface import RuntimeParams
    from pipeline.frameworks.torch import model as torch_model
    from pipeline.frameworks.torch import recipe, runtime

    p = config.load("train", train.TrainParams, REPO / "params.yaml")
    rt = config.load("runtime", RuntimeParams, REPO / "params.yaml")
    prep = config.load("prepare", prepare.PrepareParams, REPO / "params.yaml")
    device = runtime.configure(rt)
    # The train split's shape and size without running the earlier stages: digits-sized noise
    # (image_size auto stores the digits at their native 8 px).
    n, side = 1257, 8 if prep.image_size == "auto" else prep.image_size
    rng = np.random.default_rng(0)
    split = formats.Split(rng.integers(0, 256, (n, side, side, 1), dtype=np.uint8),
                       rng.integers(0, 10, n), tuple(str(i) for i in range(10)))
    images = torch.from_numpy(np.array(split.images)).permute(0, 3, 1, 2)  # uint8 (N, C, H, W), in memory
    labels = torch.from_numpy(np.asarray(split.labels, dtype=np.int64))
    staged = recipe.stage(images, device, p.channels_last)  # as fit() does once per fit

    def fresh_model():
        torch.manual_seed(0)
        model = torch_model.ScratchCNN(**train.model_args(p, split))
        return model.to(device, memory_format=torch.channels_last if p.channels_last else torch.preserve_format)

    def pipeline_epoch() -> float:
        model = fresh_model()
        params = [q for q in model.parameters() if q.requires_grad]
        optimizer = recipe.make_optimizer(params, p)
        scheduler = recipe.make_scheduler(optimizer, p, -(-n // p.batch_size))
        generator = torch.Generator().manual_seed(0)
        started = time.perf_counter()
        recipe.train_one_epoch(model, staged, labels, optimizer, scheduler, p, device, generator)
        return n / (time.perf_counter() - started)

    def bare_epoch(same_recipe: bool) -> float:
        """The training maths written out inline: with `same_recipe`, the same augmentation, label
        smoothing, clipping and schedule as the train params; without, plain AdamW steps."""
        model = fresh_model()
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
        steps = -(-n // p.batch_size)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=p.lr, total_steps=p.epochs * steps, pct_start=p.warmup_fraction, cycle_momentum=False,
        )
        generator = torch.Generator().manual_seed(0)
        x_all = images.float().div(255).contiguous(memory_format=torch.channels_last)  # the same in-memory tensors
        started = time.perf_counter()
        for idx in torch.randperm(n, generator=generator).split(p.batch_size):
            x, y = x_all[idx], labels[idx]
            if same_recipe:
                x = recipe.random_shift(x, p.augment_shift, generator)
            loss = F.cross_entropy(model(x), y, label_smoothing=p.label_smoothing if same_recipe else 0.0)
            optimizer.zero_grad()
            loss.backward()
            if same_recipe:
                torch.nn.utils.clip_grad_norm_(model.parameters(), p.grad_clip)
            optimizer.step()
            if same_recipe:
                scheduler.step()
        return n / (time.perf_counter() - started)

    runs = {
        "pipeline": pipeline_epoch,
        "bare, same recipe": lambda: bare_epoch(True),
        "bare, plain AdamW": lambda: bare_epoch(False),
    }
    for fn in runs.values():
        fn()  # warm-up: first-call allocations and kernel selection
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):  # alternate so that machine noise hits all alike
        for name, fn in runs.items():
            rates[name].append(fn())
    median = {name: statistics.median(v) for name, v in rates.items()}
    ratio = median["pipeline"] / median["bare, same recipe"]
    return [
        "## Train stage throughput against a bare PyTorch loop", "",
        f"Same model, batch size {p.batch_size}, {n} images of {prep.image_size}x{prep.image_size}, "
        f"{rt.thread_count} threads, median of {repeats} alternating epochs each. The 'same recipe' loop "
        "does the train params' maths inline (random shifts, label smoothing, clipping, one-cycle "
        "schedule); the plain loop shows what the recipe itself costs.", "",
        "| loop | images/s |", "|---|---|",
        *[f"| {name} | {rate:.0f} |" for name, rate in median.items()], "",
        f"- ratio pipeline / bare loop with the same recipe: **{ratio:.2f}** (target: at least 1.0 within noise)", "",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-repro", action="store_true", help="skip the whole-pipeline timing")
    parser.add_argument("--no-throughput", action="store_true", help="skip the throughput comparison")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--against", metavar="REV", help="also time this git revision's dvc repro -f, alternated")
    parser.add_argument("--repeats-repro", type=int, default=1)
    args = parser.parse_args(argv)
    lines = [] if args.no_throughput else bench_throughput(args.repeats)
    if not args.no_repro:
        lines += bench_repro(args.against, args.repeats_repro)
    report("Benchmark results", lines, "latest")


if __name__ == "__main__":
    main()
