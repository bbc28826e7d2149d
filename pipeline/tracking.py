"""One reporting path for every stage: DVC metrics and plots (through DVCLive) and MLflow.

DVC-tracked files get only deterministic figures (losses, accuracies, counts): `dvc repro -f`
must reproduce them byte for byte. Wall-clock timings, host facts and artifacts go to MLflow
only. The MLflow store defaults to SQLite in the repository root; runs made by
`dvc exp run --temp` or a queue execute in a copy under `.dvc/tmp/exps/`, so the root is
resolved past that copy, or every such run would land in a store that DVC deletes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "cnn-pipeline"
STORE_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"


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


class StageRun:
    """What a stage reports through; made by `stage_run`."""

    def __init__(self, stage: str, live: Any | None, mlflow: Any) -> None:
        self.stage = stage
        self._live = live
        self._mlflow = mlflow

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> None:
        """Per-epoch curves: a DVC plot per metric and an MLflow metric history."""
        if self._live is not None:
            for name, value in metrics.items():
                self._live.log_metric(name, float(value))
            self._live.next_step()
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=epoch)

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
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()})

    def log_timing(self, metrics: Mapping[str, float]) -> None:
        """Wall-clock figures: MLflow only, so DVC-tracked files stay reproducible."""
        self._mlflow.log_metrics({f"time/{k}": float(v) for k, v in metrics.items()})

    def set_tags(self, tags: Mapping[str, str]) -> None:
        self._mlflow.set_tags(dict(tags))

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self._mlflow.log_artifacts(str(path), folder or path.name)
        else:
            self._mlflow.log_artifact(str(path), folder)

    def log_figure(self, figure: Any, name: str) -> None:
        self._mlflow.log_figure(figure, name)

    def log_dict(self, obj: Any, name: str) -> None:
        self._mlflow.log_dict(obj, name)

    def log_confusion_matrix(self, actual: Sequence[str], predicted: Sequence[str]) -> None:
        """Rows of (actual, predicted) that `dvc plots` draws as a confusion matrix."""
        if self._live is not None:
            self._live.log_sklearn_plot("confusion_matrix", list(actual), list(predicted), name="confusion_matrix.json")


@contextlib.contextmanager
def stage_run(stage: str, params: Mapping[str, Any], live_dir: Path | None = None) -> Iterator[StageRun]:
    """Open the stage's MLflow run (and DVCLive folder, when the stage has DVC metrics)."""
    logging.getLogger("alembic").setLevel(logging.WARNING)  # schema migrations log per step
    import mlflow

    root = repo_root()
    mlflow.set_tracking_uri(tracking_uri(root))
    experiment_id = _experiment_id(mlflow, os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT), root)
    live = None
    if live_dir is not None:
        from dvclive import Live

        # dvcyaml=None: dvc.yaml declares the metrics and plots; DVCLive must not rewrite it.
        live = Live(str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None)
    started = time.perf_counter()
    tags = {"stage": stage, **git_tags(root)}
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, tags=tags):
        mlflow.log_params(flatten(params))
        run = StageRun(stage, live, mlflow)
        try:
            yield run
        finally:
            if live is not None:
                live.end()
        run.log_timing({"stage_seconds": time.perf_counter() - started})


def _experiment_id(mlflow: Any, name: str, root: Path) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    # An absolute artifact root: the default ('./mlruns' under the current folder) would put
    # artifacts of runs made in a temporary experiment copy into a folder DVC deletes.
    location = (root / ARTIFACT_DIR).as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except Exception:  # a parallel stage created it first (queued experiments)
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id

