"""The MLflow side of a stage's reporting: where runs go, what they are tagged with, and the
worker process that makes the calls. Nothing here shapes a DVC-tracked output, so no stage lists
this module in dvc.yaml (tests/unit/test_layout.py holds it to that: it is an observer).

The MLflow store defaults to SQLite in the repository root; runs made by `dvc exp run --temp`
or a queue execute in a copy under `.dvc/tmp/exps/`, so the root is resolved past that copy,
or every such run would land in a store that DVC deletes.

MLflow calls run in a worker process (`python -m pipeline.tracking.worker`) fed JSON lines on its
stdin: importing MLflow and opening its store take ~4 s, which the worker spends on the other
core while the stage imports torch and works. The entry point (`python -m pipeline <stage>`)
starts the worker before the stage's heavy imports, and the stage waits for it at the end, so
the run is complete, or the stage fails, before DVC moves on. A worker that cannot use the
store makes the stage stop at its next call with a TrackingError. Files made only to be logged
live in a scratch folder named with the stage's pid; the next stage removes those whose
process is gone (a SIGKILL skips every cleanup).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline import config
from pipeline.errors import TrackingError

EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"
PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # on the worker's PYTHONPATH
ATTEMPT_TAG = "pipeline.attempt"  # one process's try at a stage: a resumed run names the one it continues
DRIVER_TAG = "pipeline.driver"  # the `dvc repro` / `dvc exp run` process a run belongs to (workspace.Driver)
DEFAULT_EXPERIMENT = "cnn-pipeline"
# a run id: the parent runs of the pipeline executions that see it nest under that run (a sweep's)
PARENT_RUN_ENV = "PIPELINE_PARENT_RUN_ID"
STORE_FILE = "mlflow.db"
ARTIFACT_DIR = "mlartifacts"
OFFLINE_STORE = "mlflow-offline.db"  # tracking.offline_fallback's store, in the repository root
SCRATCH_PREFIX = "pipeline-mlflow-"
# the calls a stage sends its MLflow worker (JSON lines {"op": ..., ...}); tracking.worker has
# one handler for each, and checks at start-up that the two lists are the same
OPS = frozenset({"start", "log_input", "log_model", "register", "log_group_metrics", "start_child", "end_child",
                 "end", "log_metrics", "set_tags", "link_resumed", "log_artifact", "log_artifacts"})


@dataclasses.dataclass(frozen=True)
class TrackingParams:
    """params.yaml `tracking:` (optional). It shapes where runs are logged, never what a stage
    builds, so no stage lists it in dvc.yaml: changing it reruns nothing."""

    offline_fallback: bool = False  # an unreachable server: log to OFFLINE_STORE instead of failing
    timeout_seconds: int = 10  # an HTTP request to the server
    http_retries: int = 2  # retries of a failed request, with 1, 2, 4... s between them
    lock_wait_seconds: float = 120.0  # how long a call waits for a locked SQLite store

    def __post_init__(self) -> None:
        config.check(self.timeout_seconds >= 1, "timeout_seconds", f"must be >= 1, got {self.timeout_seconds}")
        config.check(0 <= self.http_retries <= 10, "http_retries", f"must be in 0..10, got {self.http_retries}")
        config.check(self.lock_wait_seconds >= 0, "lock_wait_seconds", f"must be >= 0, got {self.lock_wait_seconds}")


def load_tracking_params(path: Path = config.PARAMS_FILE) -> TrackingParams:
    """The `tracking:` section, or its defaults when params.yaml has none (or there is no params.yaml)."""
    if not path.is_file():
        return TrackingParams()
    try:
        raw = config.read_params(path)
    except config.ConfigError:  # an unreadable params.yaml is the stage's to report, in its own words
        return TrackingParams()
    if "tracking" not in raw:
        return TrackingParams()
    return config.from_dict(raw["tracking"], TrackingParams, where=f"{path}: tracking")


def experiment_name() -> str:
    return os.environ.get(EXPERIMENT_ENV, DEFAULT_EXPERIMENT)


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


def sqlite_file(uri: str) -> str | None:
    """The file of a `sqlite:///` store URI, else None (a server, another database)."""
    return uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None


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
    # what `dvc repro` itself rewrites (dvc.lock, the git-tracked metrics it deletes before a stage
    # runs) is not a change to the code or params: counted, every repro would read as dirty
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                 *(f":(exclude,glob){p}" for p in pipeline_outputs(root)))
    return {
        "git_commit": commit or "none",
        "git_dirty": "unknown" if status is None else str(bool(status)).lower(),
        # set by `dvc exp run` (workspace, --temp and queued); empty for plain `dvc repro`
        "dvc_exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc_exp_baseline": os.environ.get("DVC_EXP_BASELINE_REV", ""),
    }


def pipeline_outputs(root: Path) -> list[str]:
    """dvc.lock and every output dvc.yaml declares (outs, metrics, plots), as git glob patterns
    (a foreach stage's `${item}` matching any name), each also for what is under it."""
    import re

    import yaml

    try:
        spec = yaml.safe_load((root / "dvc.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return ["dvc.lock"]
    found = ["dvc.lock"]
    for stage in (spec.get("stages") or {}).values():
        body = stage.get("do", stage) if isinstance(stage, dict) else {}
        for key in ("outs", "metrics", "plots"):
            for entry in body.get(key) or []:
                path = re.sub(r"\$\{[^}]*\}", "*", str(next(iter(entry)) if isinstance(entry, dict) else entry))
                found += [path, f"{path}/**"]
    return found


def group_name(git: Mapping[str, str]) -> str:
    """The parent run's name: the DVC experiment, else the commit of a plain `dvc repro`, marked
    `-dirty` (as `git describe --dirty` does) when tracked files differed from it as it began."""
    if git.get("dvc_exp_name"):
        return git["dvc_exp_name"]
    if git.get("git_commit", "none") == "none":
        return "repro"
    return f"repro {git['git_commit'][:7]}{'-dirty' if git.get('git_dirty') == 'true' else ''}"


class MlflowWorker:
    """The child process that makes this stage's MLflow calls, in order."""

    def __init__(self) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH")])),
        }
        root = repo_root()
        self.uri = tracking_uri(root)
        self._proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline.tracking.worker",
                self.uri,
                experiment_name(),
                str(root),
            ],
            stdin=subprocess.PIPE,
            text=True,
            env=env,
            # Its own process group: a terminal's Ctrl-C goes to the stage, which says how the
            # run ends; delivered to the worker during its start-up, it printed a traceback.
            process_group=0,
        )

    def call(self, op: str, **kwargs: Any) -> None:
        """Queue one MLflow call; a worker that has died (its one-line error is printed above)
        stops the stage here, so a stage does not work for minutes to lose its run."""
        if op not in OPS:
            raise ValueError(f"unknown MLflow worker call {op!r}; valid: {sorted(OPS)}")
        self._check()
        try:
            self._proc.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
            self._proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._check(self._proc.wait())

    def _check(self, code: int | None = None) -> None:
        code = self._proc.poll() if code is None else code
        if code:
            raise TrackingError(f"MLflow logging failed: its worker stopped (exit code {code}; its error is "
                                f"printed above) for the store {self.uri}")

    def close(self, status: str, fail_experiment: dict | None = None) -> None:
        """End the run and wait for every call to land; raise if MLflow failed."""
        with contextlib.suppress(TrackingError):
            self.call("end", status=status, fail_experiment=fail_experiment)
        with contextlib.suppress(BrokenPipeError, OSError):
            self._proc.stdin.close()
        code = self._proc.wait()
        if code != 0 and status == "FINISHED":
            self._check(code)


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


class SilentWorker:
    """The worker of a stage's rank > 0 under torchrun: rank 0 alone logs."""

    uri = ""

    def call(self, op: str, **kwargs: Any) -> None:
        pass

    def close(self, status: str, fail_experiment: dict | None = None) -> None:
        pass


def remove_orphan_scratch(folder: Path | None = None) -> None:
    """Remove scratch folders of stages whose process is gone (SIGKILL leaves them behind)."""
    import shutil

    folder = Path(folder or tempfile.gettempdir())
    for path in folder.glob(f"{SCRATCH_PREFIX}*"):
        pid = path.name[len(SCRATCH_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
