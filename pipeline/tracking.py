"""One reporting path for every stage: DVC metrics and plots (through DVCLive) and MLflow.

DVC-tracked files get only deterministic figures (losses, accuracies, counts): `dvc repro -f`
must reproduce them byte for byte. Wall-clock timings, host facts and artifacts go to MLflow
only. The MLflow store defaults to SQLite in the repository root; runs made by
`dvc exp run --temp` or a queue execute in a copy under `.dvc/tmp/exps/`, so the root is
resolved past that copy, or every such run would land in a store that DVC deletes.

MLflow calls run in a worker process (`python -m pipeline.tracking_worker`) fed JSON lines on its
stdin: importing MLflow and opening its store take ~4 s, which the worker spends on the other
core while the stage imports torch and works. The entry point (`python -m pipeline <stage>`)
starts the worker before the stage's heavy imports, and the stage waits for it at the end, so
the run is complete, or the stage fails, before DVC moves on.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "cnn-pipeline"
STORE_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # on the worker's PYTHONPATH


def repo_root(cwd: Path | None = None) -> Path:
    """The user's repository root, also when DVC runs the stage in a temporary copy."""
    cwd = (cwd or Path.cwd()).resolve()
    for parent in [cwd, *cwd.parents]:
        # dvc exp run --temp and queued runs execute in <root>/.dvc/tmp/exps/<...>/
        if parent.name == "exps" and parent.parent.name == "tmp" and parent.parent.parent.name == ".dvc":
            return parent.parent.parent.parent
    return cwd


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{root / STORE_FILE}"


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': TrainParams(lr=...)} -> {'train.lr': ...}; dataclasses and dicts alike."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def git_tags(root: Path) -> dict[str, str]:
    """Commit and dirty flag of the checkout the stage runs in (for --temp and queued runs, DVC's
    copy at the experiment's baseline), and the DVC experiment it belongs to."""
    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=True)
        except (OSError, subprocess.CalledProcessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "git_commit": commit or "none",
        "git_dirty": "unknown" if status is None else str(bool(status)).lower(),
        # set by `dvc exp run` (workspace, --temp and queued); empty for plain `dvc repro`
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc_exp_baseline": os.environ.get("DVC_EXP_BASELINE_REV", ""),
    }


class MlflowWorker:
    """The child process that makes this stage's MLflow calls, in order."""

    def __init__(self) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])),
        }
        root = repo_root()
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline.tracking_worker",
                tracking_uri(root),
                os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT),
                str(root),
            ],
            stdin=subprocess.PIPE,
            text=True,
            env=env,
        )

    def call(self, op: str, **kwargs: Any) -> None:
        try:
            self._proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # the worker died; close() reports it with the worker's own error above

    def close(self, status: str) -> None:
        """End the run and wait for every call to land; raise if MLflow failed."""
        self.call("end", status=status)
        with contextlib.suppress(BrokenPipeError, OSError):
            self._proc.stdin.close()
        code = self._proc.wait()
        if code != 0 and status == "FINISHED":
            raise RuntimeError(f"MLflow logging failed (worker exit code {code}; its error is printed above)")


_worker: MlflowWorker | None = None


def start_worker() -> None:
    """Start the MLflow worker now, so that its imports overlap the stage's own."""
    global _worker
    if _worker is None:
        _worker = MlflowWorker()


def _take_worker() -> MlflowWorker:
    global _worker
    start_worker()
    worker, _worker = _worker, None
    return worker


class StageRun:
    """What a stage reports through; made by `stage_run`."""

    def __init__(self, stage: str, live: Any | None, worker: MlflowWorker, scratch: Path) -> None:
        self.stage = stage
        self._live = live
        self._worker = worker
        self._scratch = scratch  # files made only to be logged; removed once the worker is done

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Per-epoch curves: a DVC plot per metric and an MLflow metric history."""
        if self._live is not None:
            for name, value in metrics.items():
                self._live.log_metric(name, float(value))
            self._live.next_step()
        self._worker.call("log_metrics", metrics={k: float(v) for k, v in metrics.items()}, step=epoch)

    def log_summary(self, metrics: Mapping[str, float | int]) -> None:
        """Final metrics: `dvc metrics show` (metrics.json) and MLflow.

        'test/acc' nests as {"test": {"acc": ...}} in metrics.json, as DVCLive nests curves."""
        if self._live is not None:
            for name, value in metrics.items():
                node = self._live.summary
                *parents, leaf = name.split("/")
                for part in parents:
                    node = node.setdefault(part, {})
                node[leaf] = value
            self._live.make_summary()
        self._worker.call("log_metrics", metrics={k: float(v) for k, v in metrics.items()}, step=None)

    def log_timing(self, metrics: Mapping[str, float]) -> None:
        """Wall-clock figures: MLflow only, so DVC-tracked files stay reproducible."""
        self._worker.call("log_metrics", metrics={f"time/{k}": float(v) for k, v in metrics.items()}, step=None)

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._worker.call("set_tags", tags={k: str(v) for k, v in tags.items()})

    def log_choices(self, choices: Mapping[str, object]) -> None:
        """What the stage's `auto` params resolved to: printed for the log and tagged in MLflow."""
        print(f"{self.stage}: " + ", ".join(f"{k} {v}" for k, v in choices.items()))
        self.set_tags({k: str(v) for k, v in choices.items()})

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        """Log a file or a folder's files (under `folder`); they must stay until the stage ends."""
        path = Path(path).resolve()
        if path.is_dir():
            self._worker.call("log_artifacts", path=str(path), folder=folder or path.name)
        else:
            self._worker.call("log_artifact", path=str(path), folder=folder)

    def log_figure(self, figure: Any, name: str) -> None:
        path = self._scratch / name
        figure.savefig(path, dpi=100, bbox_inches="tight")
        self.log_artifact(path)

    def log_dict(self, obj: Any, name: str) -> None:
        path = self._scratch / name
        path.write_text(json.dumps(obj, indent=2, sort_keys=True))
        self.log_artifact(path)

    def log_confusion_matrix(self, actual: Sequence[str], predicted: Sequence[str]) -> None:
        """Rows of (actual, predicted) that `dvc plots` draws as a confusion matrix."""
        if self._live is not None:
            self._live.log_sklearn_plot("confusion_matrix", list(actual), list(predicted), name="confusion_matrix.json")


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any], live_dir: Path | None = None) -> Iterator[StageRun]:
    """Open the stage's MLflow run (and DVCLive folder, when the stage has DVC metrics)."""
    started = time.perf_counter()
    worker = _take_worker()
    status = "FAILED"
    with tempfile.TemporaryDirectory(prefix=f"{stage.replace('@', '-')}-mlflow-") as scratch:
        try:
            worker.call(
                "start",
                run_name=stage,
                tags={"stage": stage, **git_tags(Path.cwd())},
                params={k: str(v) for k, v in flatten(params).items()},
            )
            live = None
            if live_dir is not None:
                from dvclive import Live

                # dvcyaml=None: dvc.yaml declares the metrics and plots; DVCLive must not rewrite it.
                live = Live(str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None)
            run = StageRun(stage, live, worker, Path(scratch))
            try:
                yield run
            finally:
                if live is not None:
                    live.end()
            run.log_timing({"stage_seconds": time.perf_counter() - started})
            status = "FINISHED"
        finally:
            worker.close(status)
