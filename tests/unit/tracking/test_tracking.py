"""One reporting path: DVCLive files for DVC, everything else to MLflow."""

import dataclasses
import json
import subprocess
from pathlib import Path

import mlflow
from support import REPO

from pipeline.tracking import store
from pipeline.tracking.run import stage_run

STAGE_RUNS = "tags.stage LIKE '%'"  # not the parent runs that group one execution's stages


def test_repo_root_resolves_past_a_temporary_experiment_copy(tmp_path):
    repo = tmp_path / "project"
    temp = repo / ".dvc" / "tmp" / "exps" / "tmpab12cd"
    temp.mkdir(parents=True)
    assert store.repo_root(temp) == repo.resolve()
    assert store.repo_root(repo / ".dvc" / "tmp" / "exps" / "run" / "abc" ) == repo.resolve()
    assert store.repo_root(repo) == repo.resolve()


def test_default_store_is_sqlite_in_the_repository_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert store.tracking_uri(tmp_path) == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert store.tracking_uri(tmp_path) == "http://mlflow.internal:5000"


def test_flatten_turns_sections_into_dotted_params():
    from pipeline.evaluate import EvaluateParams

    assert store.flatten({"evaluate": EvaluateParams(batch_size=8), "model": "scratch"}) == {
        "evaluate.batch_size": 8, "evaluate.calibrate": True, "evaluate.explain_images": 8,
        "evaluate.error_images": 12, "evaluate.seed": 0, "model": "scratch",
    }


def test_a_stage_run_reaches_dvc_files_and_mlflow(workdir, mlflow_store, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "lucky-lark")
    with stage_run("train", {"train": {"lr": 0.1}}, live_dir=Path("live")) as run:
        run.log_epoch(0, {"train/loss": 1.0, "val/acc": 0.5})
        run.log_epoch(1, {"train/loss": 0.5, "val/acc": 0.75})
        run.log_summary({"val/acc": 0.75})
        run.log_timing({"fit_seconds": 1.5})
    metrics = json.loads((workdir / "live" / "metrics.json").read_text())
    assert metrics["val"]["acc"] == 0.75  # nested, like the curves
    assert "time" not in json.dumps(metrics)  # wall-clock figures stay out of DVC-tracked files
    assert (workdir / "live" / "plots" / "metrics" / "train" / "loss.tsv").read_text() == "step\tloss\n0\t1.0\n1\t0.5\n"

    client = mlflow.MlflowClient(mlflow_store)
    (experiment,) = [e for e in client.search_experiments() if e.name == store.DEFAULT_EXPERIMENT]
    (run_info,) = client.search_runs([experiment.experiment_id], STAGE_RUNS)
    assert run_info.info.run_name == "train"
    assert run_info.data.params["train.lr"] == "0.1"
    assert run_info.data.tags["stage"] == "train"
    assert run_info.data.tags["dvc_exp_name"] == "lucky-lark"
    assert run_info.data.tags["mlflow.source.name"] == "pipeline/train.py"  # the stage, not the worker
    experiment = client.get_experiment(run_info.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI opens on the runs
    assert {"git_commit", "git_dirty"} <= set(run_info.data.tags)
    assert [m.value for m in client.get_metric_history(run_info.info.run_id, "train/loss")] == [1.0, 0.5]
    assert run_info.data.metrics["time/fit_seconds"] == 1.5
    assert experiment.artifact_location.startswith("file://") and Path(experiment.artifact_location[7:]).is_absolute()


def test_a_failing_stage_marks_its_mlflow_run_failed(workdir, mlflow_store):
    try:
        with stage_run("prepare", {}):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    client = mlflow.MlflowClient(mlflow_store)
    (experiment,) = [e for e in client.search_experiments() if e.name == store.DEFAULT_EXPERIMENT]
    (run_info,) = client.search_runs([experiment.experiment_id], STAGE_RUNS)
    assert run_info.info.status == "FAILED"


def test_an_unreachable_mlflow_store_fails_the_stage(workdir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://store")  # MLflow has no such store
    import pytest

    from pipeline.errors import TrackingError

    with pytest.raises(TrackingError, match="MLflow logging failed: its worker stopped .*nosuchscheme://store"):
        with stage_run("ingest", {}) as run:
            run.log_summary({"images": 1})


def test_artifacts_and_figures_reach_mlflow(workdir, mlflow_store):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (workdir / "model.bin").write_bytes(b"weights")
    (workdir / "export").mkdir()
    (workdir / "export" / "model.onnx").write_bytes(b"onnx")
    with stage_run("export@scratch", {}) as run:
        run.log_artifact(workdir / "model.bin", "model")
        run.log_artifact(workdir / "export")
        run.log_dict({"a": 1}, "report.json")
        run.log_figure(plt.figure(), "figure.png")
    client = mlflow.MlflowClient(mlflow_store)
    (experiment,) = [e for e in client.search_experiments() if e.name == store.DEFAULT_EXPERIMENT]
    (run_info,) = client.search_runs([experiment.experiment_id], STAGE_RUNS)
    paths = {a.path for a in client.list_artifacts(run_info.info.run_id)}
    assert paths == {"model", "export", "report.json", "figure.png"}
    assert [a.path for a in client.list_artifacts(run_info.info.run_id, "export")] == ["export/model.onnx"]


def test_what_dvc_repro_rewrites_does_not_make_a_checkout_dirty(tmp_path):
    """dvc.lock and the git-tracked metrics DVC deletes before a stage runs are the pipeline's own
    writes; params.yaml or code are changes to the checkout."""
    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  a:\n    cmd: x\n    outs: [{reports: {cache: false}}]\n    metrics: [{dvclive/a/metrics.json: "
        "{cache: false}}]\n  b:\n    foreach: [m, n]\n    do:\n      cmd: y\n      outs:\n        - exports/${item}\n")
    for rel in ("dvc.lock", "params.yaml", "reports/r.md", "dvclive/a/metrics.json", "exports/m/model.json"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("1")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "x")
    assert store.git_tags(tmp_path)["git_dirty"] == "false"
    (tmp_path / "dvclive/a/metrics.json").unlink()
    (tmp_path / "dvc.lock").write_text("2")
    (tmp_path / "reports/r.md").write_text("2")
    (tmp_path / "exports/m/model.json").write_text("2")
    assert store.git_tags(tmp_path)["git_dirty"] == "false"
    (tmp_path / "params.yaml").write_text("2")
    assert store.git_tags(tmp_path)["git_dirty"] == "true"


def test_a_parent_is_named_after_the_experiment_else_the_commit():
    def name(exp: str, commit: str, dirty: str) -> str:
        return store.group_name({"dvc_exp_name": exp, "git_commit": commit, "git_dirty": dirty})

    assert name("keen-kiwi", "20b81ab6e7", "true") == "keen-kiwi"
    assert name("", "20b81ab6e7", "false") == "repro 20b81ab"
    assert name("", "20b81ab6e7", "true") == "repro 20b81ab-dirty"
    assert name("", "none", "unknown") == "repro"


def test_the_stage_runs_of_one_execution_nest_under_one_parent_with_its_dataset(workdir, mlflow_store, monkeypatch):
    """One parent run per `dvc repro` / `dvc exp run` (named after the experiment), made by the
    first stage that runs; another execution gets its own; the dataset is each run's input."""
    from pipeline.runtime import workspace

    monkeypatch.setenv("DVC_EXP_NAME", "keen-kiwi")
    prepared = workdir / "prepared"
    prepared.mkdir()
    (prepared / "dataset.json").write_text(json.dumps({"source": "digits", "sha256": "ab" * 32}))
    with stage_run("train", {}) as run:
        run.log_dataset(prepared, "training")
    with stage_run("report", {}) as run:
        run.log_group_metrics({"scratch/test_acc": 0.9})
    monkeypatch.setattr(workspace, "_driver", dataclasses.replace(workspace.driver(), pid=1, started=1.0))
    monkeypatch.setenv("DVC_EXP_NAME", "")
    with stage_run("train", {}):
        pass
    client = mlflow.MlflowClient(mlflow_store)
    runs = client.search_runs([client.get_experiment_by_name("cnn-pipeline").experiment_id])
    parents = {r.info.run_name: r for r in runs if r.data.tags.get("pipeline.group") == "true"}
    assert set(parents) == {"keen-kiwi", "repro"}  # a plain run outside git: no commit to name it by
    first = parents["keen-kiwi"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == first.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["report", "train"]
    assert first.data.metrics == {"scratch/test_acc": 0.9} and first.info.status == "FINISHED"
    train = next(r for r in children if r.info.run_name == "train")
    (dataset,) = train.inputs.dataset_inputs
    assert (dataset.dataset.name, dataset.dataset.digest) == ("digits", ("ab" * 32)[:36])
    assert dataset.tags[0].value == "training"


def test_the_stage_and_its_worker_share_one_list_of_calls():
    """Every call the facade sends is one store.OPS names, and the worker has a handler
    for each (it checks at start-up; an unknown call is refused on the stage's side)."""
    import re

    from pipeline.tracking import store

    tracking = REPO / "pipeline" / "tracking"
    sent = set(re.findall(r'_worker\.call\(\s*"(\w+)"', (tracking / "run.py").read_text()))
    sent |= set(re.findall(r'self\.call\(\s*"(\w+)"', (tracking / "store.py").read_text()))
    assert sent <= store.OPS and sent, sent
    handled = set(re.findall(r'^        "(\w+)": ', (tracking / "worker.py").read_text(), re.M))
    assert handled == store.OPS
    try:
        store.MlflowWorker.call(None, "no_such_call")
    except ValueError as exc:
        assert "no_such_call" in str(exc)
    else:
        raise AssertionError("an unknown call was accepted")
