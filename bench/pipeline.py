"""Benchmarks: whole-pipeline wall time and the train stage's throughput against a bare loop.

    python -m bench.pipeline             # both (make bench)
    python -m bench.pipeline --no-repro  # throughput only
    python -m bench.pipeline --against 8232335 --no-throughput  # this tree's repro beside a commit's
    python -m bench.pipeline --no-throughput --against 8232335 --set data.source=folder --set data.folder=PATH

1. `dvc repro -f` of the real dvc.yaml and params.yaml in a temporary copy of the repository,
   timed end to end, its output streamed and timestamped line by line. A table gives each stage
   process's wall time (from DVC's `Running stage` line to the next stage's, the last to DVC's
   exit), its in-process time (the MLflow run's `time/stage_seconds`; sync has none) and the
   difference, its fixed cost: DVC's per-stage work, interpreter start, imports, the MLflow worker
   wait and the exit (target: under 1.5 s per stage process). With `--against REV`, the same run
   of that git revision's pipeline in a second copy, alternated with this tree's
   `--repeats-repro` times (medians per stage), its columns beside this tree's, so that "no
   slower than REV" is a ratio measured side by side, for the whole run and for the summed fixed
   cost. Then the sync stage's own costs.
2. Training throughput (images per second) of `recipe.train_one_epoch` with the train
   stage's params against a bare PyTorch loop (forward, loss, backward, optimizer step) over the
   same in-memory tensors and the same model, measured side by side, alternating, in one run.
   The ratio is what counts; absolute figures depend on the machine.

Results go to stdout and to bench/results/latest.md; nothing here is asserted in tests.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import REPO, parse_sets, report, set_params


def pipeline_file(rel: str) -> bool:
    """What a copy of the pipeline needs: its code, DVC's files and the bundled sources."""
    return rel.startswith(("pipeline/", ".dvc/", "data/sources/", "data/review/")) or rel in {
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


STAGE_LINE = re.compile(r"^(?P<event>Running stage|Stage) '(?P<name>[^']+)'")  # DVC's start or skip of a stage


@dataclass(frozen=True)
class StageTime:
    wall: float  # from DVC's `Running stage` line to the next stage's line, or to DVC's exit
    inproc: float | None  # the MLflow run's time/stage_seconds; None: no run (sync)
    fixed: float  # wall - in-process: DVC's per-stage work, interpreter start, imports, worker wait, exit


@dataclass(frozen=True)
class Repro:
    total: float  # the whole `dvc repro -f`
    before: float  # DVC alone, before its first stage line
    stages: dict[str, StageTime]  # in the order DVC ran them


def stage_walls(lines: list[tuple[float, str]], started: float, ended: float) -> tuple[float, dict[str, float]]:
    """Seconds before the first stage line, and each run stage's wall seconds, from `dvc repro`'s
    timestamped output. A skipped stage's line also ends the stage before it, but gets no row."""
    marks = [(at, m["event"], m["name"]) for at, line in lines if (m := STAGE_LINE.match(line))]
    ends = [at for at, _, _ in marks[1:]] + [ended]
    walls = {name: end - at for (at, event, name), end in zip(marks, ends, strict=True) if event == "Running stage"}
    return (marks[0][0] if marks else ended) - started, walls


def stage_seconds(repo: Path, names: set[str], since: float) -> dict[str, float]:
    """Each stage's in-process seconds from its latest MLflow run that started at `since` (epoch s)
    or later: this repro's runs only, whatever the store held before."""
    import mlflow

    client = mlflow.MlflowClient(bench_env(repo)["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("cnn-pipeline")
    if experiment is None:
        return {}
    runs = client.search_runs([experiment.experiment_id], f"attributes.start_time >= {int(since * 1000)}",
                              order_by=["start_time DESC"])
    found: dict[str, float] = {}
    for r in runs:  # newest first; a child run (a fold, a trial) has its own name, so it never matches
        if r.info.run_name in names and "time/stage_seconds" in r.data.metrics:
            found.setdefault(r.info.run_name, r.data.metrics["time/stage_seconds"])
    return found


def repro(repo: Path) -> Repro:
    """`dvc repro -f` in `repo`, its output streamed and timestamped line by line, with each stage's
    in-process seconds from MLflow."""
    import mlflow

    env = bench_env(repo)
    # Create the MLflow schema first: a one-off cost, not the pipeline's.
    mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments()
    since, started = time.time(), time.perf_counter()
    lines: list[tuple[float, str]] = []
    with subprocess.Popen(["dvc", "repro", "-f"], cwd=repo, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, errors="replace") as proc:
        assert proc.stdout is not None
        for line in proc.stdout:  # DVC flushes each log line, so it arrives when it is printed
            lines.append((time.perf_counter(), line))
    ended = time.perf_counter()
    if proc.returncode:
        sys.exit(f"dvc repro failed in {repo}:\n{''.join(line for _, line in lines)}")
    before, walls = stage_walls(lines, started, ended)
    inproc = stage_seconds(repo, set(walls), since)
    stages = {name: StageTime(wall, inproc.get(name), wall - inproc.get(name, 0.0)) for name, wall in walls.items()}
    return Repro(ended - started, before, stages)


def median_repro(repros: list[Repro]) -> Repro:
    """Each figure's median across repeats, stage by stage (so a stage's fixed cost is the median
    of its fixed costs, not median wall - median in-process)."""
    names = list(dict.fromkeys(name for r in repros for name in r.stages))
    stages = {}
    for name in names:
        times = [r.stages[name] for r in repros if name in r.stages]
        inprocs = [t.inproc for t in times if t.inproc is not None]
        stages[name] = StageTime(statistics.median(t.wall for t in times),
                                 statistics.median(inprocs) if inprocs else None,
                                 statistics.median(t.fixed for t in times))
    return Repro(statistics.median(r.total for r in repros), statistics.median(r.before for r in repros), stages)


def timed(cmd: list[str], repo: Path) -> float:
    """Seconds `cmd` takes in `repo` (it must succeed)."""
    started = time.perf_counter()
    subprocess.run(cmd, cwd=repo, env=bench_env(repo), capture_output=True, check=True)
    return time.perf_counter() - started


def noop_seconds(repo: Path) -> float:
    """The best of three no-op `dvc repro` in `repo`, after its `dvc repro -f`."""
    return min(timed(["dvc", "repro"], repo) for _ in range(3))


def sync_costs(repo: Path) -> list[str]:
    """Seconds of the sync stage's work: with nothing missing (alone, and the whole no-op `dvc
    repro` around it), and rebuilding every stage's run into an empty store."""
    sync = [sys.executable, "-m", "pipeline", "sync"]
    nothing = min(timed(sync, repo) for _ in range(3))
    noop = noop_seconds(repo)
    (repo / "mlflow.db").unlink()
    rebuild = timed(sync, repo)
    return [f"- `python -m pipeline sync` with nothing missing: **{nothing:.2f} s** (target: under 2 s); a no-op "
            f"`dvc repro` around it: {noop:.2f} s; every stage's run rebuilt into an empty store: {rebuild:.1f} s", ""]


def seconds(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def stage_table(sides: dict[str, Repro]) -> list[str]:
    """One row per stage, each side's wall, in-process and fixed seconds beside each other."""
    names = list(dict.fromkeys(name for r in sides.values() for name in r.stages))
    head = ["stage", *(col for label in sides for col in (f"{label} wall s", "in-process s", "fixed s"))]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in names:
        cells = [name]
        for r in sides.values():
            t = r.stages.get(name)
            cells += ["-"] * 3 if t is None else [seconds(t.wall), seconds(t.inproc), seconds(t.fixed, 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def fixed_summary(label: str, r: Repro) -> str:
    if not r.stages:
        return f"- {label}: wall {r.total:.0f} s in all, and DVC printed no stage line"
    fixed = {name: t.fixed for name, t in r.stages.items()}
    worst = max(fixed, key=fixed.__getitem__)
    staged = sum(t.inproc or 0.0 for t in r.stages.values())
    return (f"- {label}: wall {r.total:.0f} s in all (DVC alone before the first stage {r.before:.1f} s), "
            f"in-process {staged:.0f} s; fixed cost **{sum(fixed.values()):.1f} s** over {len(fixed)} stage "
            f"processes, mean **{statistics.mean(fixed.values()):.2f} s**, max {fixed[worst]:.2f} s ({worst})")


def bench_repro(against: str | None = None, repeats: int = 1, changes: dict[str, str] | None = None) -> list[str]:
    """With `changes` (`section.key` -> value), both copies' params.yaml get them (another dataset)."""
    given = ", ".join(f"`{k}={v}`" for k, v in (changes or {}).items())
    lines = [f"## `dvc repro -f` on the default params{', but ' + given if given else ''}", ""]
    with tempfile.TemporaryDirectory(prefix="bench-repro-") as tmp:
        ours, theirs = Path(tmp) / "tree", Path(tmp) / "rev"
        ours.mkdir()
        copy_repo(ours)
        if against:
            theirs.mkdir()
            copy_repo(theirs, against)
        for copy in (ours, theirs) if against else (ours,):
            if changes:
                set_params(copy, changes)
        tree_label, rev_label = "this tree", f"`{against}`"
        runs: dict[str, list[Repro]] = {tree_label: [], rev_label: []}
        for _ in range(repeats):  # alternate so that machine noise hits both alike
            runs[tree_label].append(repro(ours))
            if against:
                runs[rev_label].append(repro(theirs))
        sides = {label: median_repro(rs) for label, rs in runs.items() if rs}
        tree = sides[tree_label]
        lines += [f"- whole `dvc repro -f`: **{tree.total:.0f} s** (median of {repeats}; target: under 180 s, "
                  "aim 90 s)"]
        if against:
            rev = sides[rev_label]
            totals = {label: ", ".join(f"{r.total:.0f}" for r in rs) for label, rs in runs.items()}
            lines += [f"- the same on {rev_label}, alternated with it: {rev.total:.0f} s; this tree / {rev_label}: "
                      f"**{tree.total / rev.total:.2f}** (runs: {totals[tree_label]} s against "
                      f"{totals[rev_label]} s)"]
        lines += ["", "Per stage process, median of the repeats: wall from DVC's `Running stage` line to the next "
                  "stage's (the last: to DVC's exit); in-process is the stage's MLflow `time/stage_seconds` (sync "
                  "has no run); fixed = wall - in-process: DVC's own per-stage work (hashing, caching, dvc.lock), "
                  "the interpreter start, imports, the MLflow worker wait and the exit.", "",
                  *stage_table(sides), ""]
        lines += [fixed_summary(label, r) for label, r in sides.items()]
        lines += ["- target: fixed cost under 1.5 s per stage process"]
        if against:
            fixed = {label: sum(t.fixed for t in r.stages.values()) for label, r in sides.items()}
            lines += [f"- summed fixed cost, this tree / {rev_label}: **{fixed[tree_label] / fixed[rev_label]:.2f}**"]
        lines += ["", *sync_costs(ours)]
        if against:
            lines += [f"- a no-op `dvc repro` on {rev_label}: {noop_seconds(theirs):.2f} s", ""]
    return lines


def bench_throughput(repeats: int) -> list[str]:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from pipeline import config, prepare, train
    from pipeline.data import formats
    from pipeline.frameworks.interface import RuntimeParams
    from pipeline.frameworks.recipe import resolve_auto
    from pipeline.frameworks.torch import model as torch_model
    from pipeline.frameworks.torch import recipe, runtime

    p = config.load("train", train.TrainParams, REPO / "params.yaml")
    rt = config.load("runtime", RuntimeParams, REPO / "params.yaml")
    prep = config.load("prepare", prepare.PrepareParams, REPO / "params.yaml")
    device = runtime.configure(rt)
    # The train split's shape and size without running the earlier stages: digits-sized noise
    # (image_size auto stores the digits at their native 8 px).
    n, side = 1257, 8 if prep.image_size == "auto" else prep.image_size
    p = resolve_auto(p, n)  # the schedule's length, as the stage resolves it
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
    parser.add_argument("--set", action="append", default=[], help="section.key=value for the repro, as dvc exp run -S")
    args = parser.parse_args(argv)
    lines = [] if args.no_throughput else bench_throughput(args.repeats)
    if not args.no_repro:
        lines += bench_repro(args.against, args.repeats_repro, parse_sets(args.set))
    report("Benchmark results", lines, "latest")


if __name__ == "__main__":
    main()
