"""Reaching an MLflow store, for the worker, sync and the sweep: MLflow's HTTP retries bounded
(`bound_http`), calls retried while another process holds the SQLite file locked
(`retrying`), one process at a time creating a new store (`creating`), and the offline
fallback when a server cannot be reached (`open_store`)."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pipeline.tracking.store import ARTIFACT_DIR, OFFLINE_STORE, TrackingParams, sqlite_file

T = TypeVar("T")


def say(message: str) -> None:
    print(f"mlflow: {message}", file=sys.stderr, flush=True)


def locked(exc: BaseException) -> bool:
    return "database is locked" in str(exc)


def retrying(call: Callable[[], T], wait_seconds: float) -> T:
    """`call()`, retried with backoff while the SQLite store is locked, for up to `wait_seconds`."""
    deadline, pause = time.monotonic() + wait_seconds, 0.05
    while True:
        try:
            return call()
        except Exception as exc:
            if not locked(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 2.0)


def bound_http(p: TrackingParams) -> None:
    """MLflow's HTTP retry settings, unless the user set them: seconds, not minutes."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(p.timeout_seconds))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(p.http_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # bars for local copies, in DVC's log


# MLflow 3 opens an experiment on its GenAI overview unless it is tagged as model training
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def is_local(uri: str) -> bool:
    """A store on this machine (SQLite, a folder), not a tracking server."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def _experiment_id(mlflow: Any, name: str, root: Path, uri: str) -> str:
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is None:
        # A local store gets an absolute artifact root: the default ('./mlruns' under the current
        # folder) would put artifacts of runs made in a temporary experiment copy into a folder
        # DVC deletes. A server keeps its own (`--artifacts-destination`), which every client
        # uploads to: a folder on one colleague's disk would be invisible to the others.
        location = (root / ARTIFACT_DIR).as_uri() if is_local(uri) else None
        try:
            mlflow.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
        except Exception:  # a parallel stage created it first (queued experiments)
            pass
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:
            raise RuntimeError(f"MLflow experiment {name!r} could not be created")
    if experiment.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:  # made by an older version
        mlflow.MlflowClient().set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    return experiment.experiment_id


@contextlib.contextmanager
def creating(uri: str, suffix: str = ".lock") -> Any:
    """Hold `<store><suffix>` while MLflow opens a SQLite store: the first opener creates and
    migrates the schema, the others wait and find it done. Queued experiments open one new
    store at once; unserialised, a second migration failed with `duplicate column name: step`.
    (`pipeline.sync` holds `.sync.lock` the same way while it finds and makes missing runs.)"""
    path = sqlite_file(uri)
    try:
        import fcntl
    except ImportError:  # Windows: no flock; MLflow's own retries are all there is
        path = None
    if path is None or path in ("", ":memory:"):
        yield
        return
    try:
        lock = open(f"{path}{suffix}", "a")  # noqa: SIM115 (held across the yield)
    except OSError:  # no such folder: opening the store fails with MLflow's own message
        yield
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        yield


def open_store(mlflow: Any, uri: str, experiment: str, root: Path, p: TrackingParams) -> str:
    """Point MLflow at `uri` (or, when it cannot be used and `offline_fallback`, the local
    store) and return the experiment's id; exit with one line when neither works."""
    offline = f"sqlite:///{root / OFFLINE_STORE}"
    for target in (uri, offline):
        mlflow.set_tracking_uri(target)
        try:
            with creating(target):
                return retrying(lambda t=target: _experiment_id(mlflow, experiment, root, t), p.lock_wait_seconds)
        except Exception as exc:  # any failure to open a store: report it in one line
            first = str(exc).splitlines()[0] if str(exc) else ""
            reason = f"{type(exc).__name__}: {first[:240]}"
            if target == offline or not p.offline_fallback or uri.startswith("sqlite:"):
                say(f"error: cannot use the tracking store {target} (MLFLOW_TRACKING_URI; default "
                    f"sqlite:///{root / 'mlflow.db'}): {reason}. Start the server or fix the URI; or set "
                    "params.yaml tracking.offline_fallback: true to log to a local store meanwhile")
                sys.exit(3)
            say(f"{uri} unreachable; logging this run to {offline} instead (tracking.offline_fallback). "
                f"Browse it with `mlflow ui --backend-store-uri {offline}`; copy its runs to the server later, "
                "e.g. with the mlflow-export-import tool")
    raise AssertionError("unreachable")
