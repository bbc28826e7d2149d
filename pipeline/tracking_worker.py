"""The MLflow worker process: `python -m pipeline.tracking_worker <uri> <experiment> <root>`.

It opens the store, then applies each JSON line that `tracking.MlflowWorker` writes to its
stdin to one MLflow run, in order. Nothing here writes a DVC-tracked file.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from pipeline.tracking import ARTIFACT_DIR


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


def serve(uri: str, experiment: str, root: str) -> None:
    """The worker: open the store, then apply each JSON line from stdin to one MLflow run."""
    logging.getLogger("alembic").setLevel(logging.WARNING)  # schema migrations log every step
    import mlflow

    mlflow.set_tracking_uri(uri)
    experiment_id = _experiment_id(mlflow, experiment, Path(root))
    run = None
    status = "FAILED"  # a stage that dies without saying 'end' leaves a failed run
    for line in sys.stdin:
        msg = json.loads(line)
        op = msg.pop("op")
        if op == "start":
            run = mlflow.start_run(experiment_id=experiment_id, run_name=msg["run_name"], tags=msg["tags"])
            mlflow.log_params(msg["params"])
        elif op == "end":
            status = msg["status"]
            break
        elif op == "log_metrics":
            mlflow.log_metrics(msg["metrics"], step=msg["step"])
        elif op == "set_tags":
            mlflow.set_tags(msg["tags"])
        elif op == "log_artifact":
            mlflow.log_artifact(msg["path"], msg["folder"])
        elif op == "log_artifacts":
            mlflow.log_artifacts(msg["path"], msg["folder"])
        else:
            raise ValueError(f"unknown MLflow worker call {op!r}")
    if run is not None:
        mlflow.end_run(status)


if __name__ == "__main__":
    serve(*sys.argv[1:4])
