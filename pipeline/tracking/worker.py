"""The MLflow worker process: `python -m pipeline.tracking.worker <uri> <experiment> <root>`.

It opens the store, then applies each JSON line that `store.MlflowWorker` writes to its
stdin to one MLflow run, in order. Nothing here writes a DVC-tracked file.

Faults, each bounded (params.yaml `tracking:`; `store.TrackingParams`):
- an HTTP server that does not answer: MLflow's own retries are capped at `timeout_seconds`
  a request and `http_retries` retries, instead of its defaults (7 retries, 120 s timeouts:
  about four minutes of silence). Unreachable at start-up, the worker exits with one line
  naming the URI, and the stage stops at its next log call; with `offline_fallback` it logs
  to the local SQLite store instead and says so.
- a store another process holds locked (`database is locked`, parallel experiments on one
  SQLite file): each call is retried with backoff for up to `lock_wait_seconds`.
- the stage interrupted (Ctrl-C): the worker runs in its own process group and ignores
  SIGINT, and ends the run as the stage tells it (KILLED), or KILLED when the stage vanishes without
  a word (SIGKILL, the OOM killer). A run left RUNNING because both died is marked KILLED by
  the next worker that starts, once the process that owned it is gone.
- the stage runs of one `dvc repro` / `dvc exp run` are nested under one parent run (named
  after the DVC experiment, or the commit), which the first stage that runs creates and each
  stage's end moves on (its duration spans its runs); `pipeline.sync` completes it.
- a failed or interrupted stage of a `dvc exp run`: DVC saves no experiment, so the runs its
  earlier stages finished (same `pipeline.driver` tag) are marked FAILED too, naming the stage.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import ConfigError
from pipeline.runtime.workspace import alive_since
from pipeline.tracking.connect import bound_http, open_store, retrying, say
from pipeline.tracking.store import (
    ATTEMPT_TAG,
    DRIVER_TAG,
    OPS,
    PARENT_RUN_ENV,
    TrackingParams,
    load_tracking_params,
)

HOST_TAG, PID_TAG = "pipeline.host", "pipeline.pid"  # who owns a run while it is RUNNING
FAILED_BY_TAG = "pipeline.experiment_failed_in"  # the stage whose failure lost the experiment
GROUP_TAG = "pipeline.group"  # "true" on the parent run of one pipeline execution
GROUP_NAME_TAG = "pipeline.group_name"  # its name before the ` #N` that tells executions of one commit apart


def mark_orphans_killed(client: Any, experiment_id: str, p: TrackingParams) -> None:
    """RUNNING runs of this host whose owning process is gone (or is a newer process with the
    same pid) end as KILLED: their stage and its worker died together."""
    host = socket.gethostname()
    runs = retrying(lambda: client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and "
                                               f"tags.`{HOST_TAG}` = '{host}'"), p.lock_wait_seconds)
    for run in runs:
        pid = run.data.tags.get(PID_TAG, "")
        since = alive_since(int(pid)) if pid.isdigit() else None
        if since is None or since * 1000 > run.info.start_time + 1000:
            retrying(lambda r=run: client.set_terminated(r.info.run_id, "KILLED"), p.lock_wait_seconds)


def serve(uri: str, experiment: str, root: str) -> None:
    """The worker: open the store, then apply each JSON line from stdin to one MLflow run."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the stage's to handle; it tells us how the run ends
    logging.getLogger("alembic").setLevel(logging.WARNING)  # schema migrations log every step
    try:
        p = load_tracking_params()
    except ConfigError as exc:
        say(f"error: {exc}")
        sys.exit(3)
    bound_http(p)
    import mlflow
    from mlflow.entities import Metric

    from pipeline.tracking import models

    experiment_id = open_store(mlflow, uri, experiment, Path(root), p)
    client = mlflow.MlflowClient()
    mark_orphans_killed(client, experiment_id, p)

    def call(fn: Callable[[], object]) -> None:
        retrying(fn, p.lock_wait_seconds)

    state = {"run": None, "status": "KILLED"}  # KILLED: the stage vanished without 'end' (SIGKILL, OOM)

    def log_export(msg: dict) -> str:
        example = np.load(msg["example"], allow_pickle=False)
        return models.log_model(mlflow, Path(msg["export_dir"]), example, Path(msg["scratch"]), msg["tags"],
                                         msg.get("linked", {}), state.get("dataset"))

    def start(msg: dict) -> None:
        tags = {**msg["tags"], HOST_TAG: socket.gethostname(), PID_TAG: str(os.getppid())}
        group = msg.get("group")
        state["group"] = group_run(client, experiment_id, group["driver"], group["name"], p) if group else None
        state["run"] = retrying(lambda: mlflow.start_run(experiment_id=experiment_id, run_name=msg["run_name"],
                                                         parent_run_id=state["group"], tags=tags),
                                p.lock_wait_seconds)
        call(lambda: mlflow.log_params(msg["params"]))

    def input_(msg: dict) -> None:
        args = (msg["name"], msg["uri"], msg["digest"], msg["context"], state.get("group"))
        state["dataset"] = retrying(lambda: log_input(mlflow, *args), p.lock_wait_seconds)

    def register(msg: dict) -> None:  # the chosen export's logged model (logged here if none is found)
        def register_now() -> None:
            found = models.find_model(mlflow, experiment_id, msg["candidate"]["onnx_sha256"])
            model_id = found or log_export(msg)
            models.register(mlflow, client, msg["name"], msg["alias"], model_id, msg["candidate"])

        call(register_now)

    def group_metrics(msg: dict) -> None:  # headline figures, copied onto the execution's parent run
        if state.get("group"):
            now = int(time.time() * 1000)
            metrics = [Metric(k, float(v), now, 0) for k, v in msg["metrics"].items()]
            call(lambda: client.log_batch(state["group"], metrics=metrics))

    def start_child(msg: dict) -> None:  # a nested run (cross-validation folds); later calls log into it
        tags = {**msg["tags"], HOST_TAG: socket.gethostname(), PID_TAG: str(os.getppid())}
        retrying(lambda: mlflow.start_run(experiment_id=experiment_id, run_name=msg["run_name"], nested=True,
                                          tags=tags), p.lock_wait_seconds)
        call(lambda: mlflow.log_params(msg["params"]))

    def end(msg: dict) -> bool:
        state["status"] = msg["status"]
        state["failed"] = msg.get("fail_experiment")  # {"driver": ..., "stage": ...} or None
        return False

    # one handler per op of tracking.store.OPS, the list both sides share
    handlers: dict[str, Callable[[dict], bool | None]] = {
        "start": start,
        "log_input": input_,
        "log_model": lambda msg: call(lambda: log_export(msg)),  # an export as this run's MLflow model
        "register": register,
        "log_group_metrics": group_metrics,
        "start_child": start_child,
        "end_child": lambda msg: call(lambda: mlflow.end_run(msg["status"])),
        "end": end,
        "log_metrics": lambda msg: call(lambda: mlflow.log_metrics(msg["metrics"], step=msg["step"])),
        "set_tags": lambda msg: call(lambda: mlflow.set_tags(msg["tags"])),
        "link_resumed": lambda msg: call(lambda: link_resumed(client, experiment_id, state["run"].info.run_id,
                                                              msg["attempt"], msg["epoch"])),
        "log_artifact": lambda msg: call(lambda: mlflow.log_artifact(msg["path"], msg["folder"])),
        "log_artifacts": lambda msg: call(lambda: mlflow.log_artifacts(msg["path"], msg["folder"])),
    }
    assert set(handlers) == OPS, f"worker ops {sorted(set(handlers) ^ OPS)} differ from tracking.store.OPS"

    def apply(msg: dict) -> bool:
        """Apply one call; False once the stage said 'end'."""
        op = msg.pop("op")
        if op not in handlers:
            raise ValueError(f"unknown MLflow worker call {op!r}")
        return handlers[op](msg) is not False

    try:
        for line in sys.stdin:
            if not apply(json.loads(line)):
                break
    except BaseException:
        end_all(mlflow, "FAILED", p)  # FAILED, not the FINISHED that MLflow's exit handler would record
        raise
    end_all(mlflow, state["status"], p)
    if state.get("group"):
        touch_group(client, state["group"], p)
    if state.get("failed"):
        fail_experiment(client, experiment_id, state["failed"]["driver"], state["failed"]["stage"], p)


def log_input(mlflow: Any, name: str, uri: str, digest: str, context: str, parent: str | None = None) -> Any:
    """The prepared dataset as the active run's input, and its `parent`'s (the runs table's
    Dataset column, where a collapsed execution shows only its parent)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    with warnings.catch_warnings():  # resolving a plain path warns that it guesses a local source
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(uri)
    dataset = MetaDataset(source, name=name, digest=digest)
    mlflow.log_input(dataset, context=context)
    if parent:  # the store keeps one input per dataset and run: logging it again changes nothing
        entity = DatasetInput(dataset._to_mlflow_entity(), [InputTag(MLFLOW_DATASET_CONTEXT, context)])
        mlflow.MlflowClient().log_inputs(parent, datasets=[entity])
    return dataset


def group_run(client: Any, experiment_id: str, driver: str, name: str, p: TrackingParams) -> str:
    """The parent run of one pipeline execution (`driver`: a `dvc repro` or `dvc exp run`
    process), made by the first of its stages that runs: stages DVC skips leave no run, and
    the parent still groups those that ran. It ends FINISHED at once; it holds no work of its
    own, only the stage runs under it and the headline metrics copied onto it; each stage that
    ends moves its end time (`touch_group`), so its duration spans its runs. A second execution
    of the same commit is `<name> #2`, and so on: the runs table tells them apart."""
    query = f"tags.`{GROUP_TAG}` = 'true' and tags.`{DRIVER_TAG}` = '{driver}'"
    found = retrying(lambda: client.search_runs([experiment_id], query, max_results=1), p.lock_wait_seconds)
    if found:
        return found[0].info.run_id
    same = f"tags.`{GROUP_TAG}` = 'true' and tags.`{GROUP_NAME_TAG}` = '{name}'"
    earlier = retrying(lambda: client.search_runs([experiment_id], same, max_results=10000), p.lock_wait_seconds)
    tags = {GROUP_TAG: "true", DRIVER_TAG: driver, HOST_TAG: socket.gethostname(), GROUP_NAME_TAG: name,
            "mlflow.note.content": "One pipeline execution: its stage runs are nested under this run."}
    if os.environ.get(PARENT_RUN_ENV):  # one trial of a sweep: under the sweep's run
        tags["mlflow.parentRunId"] = os.environ[PARENT_RUN_ENV]
    run_name = f"{name} #{len(earlier) + 1}" if earlier else name
    run = retrying(lambda: client.create_run(experiment_id, run_name=run_name, tags=tags), p.lock_wait_seconds)
    retrying(lambda: client.set_terminated(run.info.run_id, "FINISHED"), p.lock_wait_seconds)
    return run.info.run_id


def touch_group(client: Any, run_id: str, p: TrackingParams) -> None:
    """The parent run ends now: the end of the last of its runs so far."""
    retrying(lambda: client.set_terminated(run_id, "FINISHED", end_time=int(time.time() * 1000)), p.lock_wait_seconds)


def link_resumed(client: Any, experiment_id: str, run_id: str, attempt: str, epoch: int) -> None:
    """Tag both ways between this run and the interrupted one whose checkpoint (`attempt`) it resumed."""
    found = client.search_runs([experiment_id], f"tags.`{ATTEMPT_TAG}` = '{attempt}'", max_results=1)
    note = f"Resumed at epoch {epoch} from a checkpoint"
    if found:
        old = found[0].info.run_id
        client.set_tag(run_id, "resumed_from_run", old)
        client.set_tag(old, "resumed_by_run", run_id)
        note += f" of run {found[0].info.run_name} ({old}), which was interrupted"
    client.set_tag(run_id, "mlflow.note.content", note + "; its curves here include the epochs before it.")


def end_all(mlflow: Any, status: str, p: TrackingParams) -> None:
    """End the open runs, a child left open by an interrupted fold first, with `status`."""
    while mlflow.active_run() is not None:
        retrying(lambda: mlflow.end_run(status), p.lock_wait_seconds)


def fail_experiment(client: Any, experiment_id: str, driver: str, stage: str, p: TrackingParams) -> None:
    """Mark FAILED the FINISHED runs of one `dvc exp run` (`driver`) that DVC did not save."""
    runs = retrying(lambda: client.search_runs([experiment_id], f"attributes.status = 'FINISHED' and "
                                               f"tags.`{DRIVER_TAG}` = '{driver}'"), p.lock_wait_seconds)
    for run in runs:
        retrying(lambda r=run: client.set_tag(r.info.run_id, FAILED_BY_TAG, stage),
                 p.lock_wait_seconds)
        retrying(lambda r=run: client.set_terminated(r.info.run_id, "FAILED"), p.lock_wait_seconds)


if __name__ == "__main__":
    serve(*sys.argv[1:4])
    # Every call has landed (each MLflow call commits). The stage waits for this process to
    # exit, and finalising MLflow's interpreter costs most of a second more.
    import atexit

    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
