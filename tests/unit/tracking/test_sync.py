"""`pipeline.sync`: the MLflow store mirrors dvc.lock (the whole pipeline: tests/e2e/test_pipeline.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import yaml
from support import REPO, lock_entry, write_lock

from pipeline import sync
from pipeline.tracking import lockfile, restore, store


def stage_runs(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("cnn-pipeline")
    return client.search_runs([experiment.experiment_id], "tags.stage LIKE '%'") if experiment else []


def test_folder_and_file_hashes_are_the_ones_dvc_records(tmp_path):
    folder = tmp_path / "data" / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("a\n")
    (folder / "sub" / "b.bin").write_bytes(bytes(range(256)) * 9)
    (tmp_path / "file.txt").write_text("line\r\nline\n")  # DVC 3 hashes bytes as they are
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*dvc, "add", "-q", "data/folder", "file.txt"], cwd=tmp_path, check=True)
    recorded = {p.stem: yaml.safe_load(p.read_text())["outs"][0]["md5"] for p in tmp_path.rglob("*.dvc") if p.is_file()}
    assert recorded["folder"] == lockfile.dir_md5(folder)
    assert recorded["file.txt"] == lockfile.file_md5(tmp_path / "file.txt")


def test_the_digest_names_the_recorded_state():
    entry = {"cmd": "c", "deps": [{"path": "d", "md5": "1"}], "outs": [{"path": "o", "md5": "2"}]}
    assert lockfile.digest(entry) == lockfile.digest(json.loads(json.dumps(entry)))
    assert lockfile.digest(entry) != lockfile.digest({**entry, "outs": [{"path": "o", "md5": "3"}]})


def test_leaves_and_curves_read_dvclive_files(tmp_path):
    assert restore.leaves({"test": {"acc": 0.5, "n": 3}, "ok": True, "name": "x"}) == {
        "test/acc": 0.5, "test/n": 3.0}
    curves = tmp_path / "plots" / "metrics" / "val"
    curves.mkdir(parents=True)
    (curves / "acc.tsv").write_text("step\tacc\n0\t0.25\n1\t0.5\n")
    assert restore.curves(tmp_path) == {"val/acc": [(0, 0.25), (1, 0.5)]}


def test_a_skipped_stage_gets_a_restored_run_once_and_a_changed_output_none(workdir, mlflow_store, capsys):
    entry = lock_entry(workdir, "ingest", {
        "dvclive/ingest/metrics.json": json.dumps({"images": 12, "classes": {"count": 2}}),
        "dvclive/ingest/details.json": json.dumps({"excluded": {"unreadable": 1}}),
    }, {"data": {"source": "digits", "folder": "data/sources"}})
    write_lock(workdir, {"ingest": entry, "sync": {"cmd": "python -m pipeline sync"}})
    db = Path(store.sqlite_file(mlflow_store))
    digest = lockfile.digest(entry)
    assert sync.mirrored(db, "cnn-pipeline", {digest}, None) is False

    sync.main([])
    (run,) = stage_runs(mlflow_store)
    assert run.info.status == "FINISHED" and run.info.run_name == "ingest (restored)"
    assert run.data.tags["stage"] == "ingest" and run.data.tags[lockfile.LOCK_TAG] == digest
    assert restore.RESTORED_TAG in run.data.tags
    assert run.data.metrics == {"images": 12.0, "classes/count": 2.0, "excluded/unreadable": 1.0}
    assert run.data.params == {"data.source": "digits", "data.folder": "data/sources"}
    assert not any(k.startswith("time/") for k in run.data.metrics)  # nothing was timed
    assert sync.mirrored(db, "cnn-pipeline", {digest}, None) is True
    parent = mlflow.MlflowClient(mlflow_store).get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.info.run_name.startswith("restored") and parent.info.end_time >= run.info.end_time

    sync.main([])  # mirrored: nothing added
    assert len(stage_runs(mlflow_store)) == 1

    # the workspace no longer holds what dvc.lock records: no run may claim that state
    changed = lock_entry(workdir, "ingest", {"dvclive/ingest/metrics.json": json.dumps({"images": 13})}, {})
    (workdir / "dvclive/ingest/metrics.json").write_text(json.dumps({"images": 14}))
    write_lock(workdir, {"ingest": changed})
    capsys.readouterr()
    sync.main([])
    assert len(stage_runs(mlflow_store)) == 1
    assert "ingest (dvclive/ingest/metrics.json differs from dvc.lock)" in capsys.readouterr().err


def test_the_alias_counts_only_with_a_version_of_the_chosen_file(workdir, mlflow_store):
    db = Path(store.sqlite_file(mlflow_store))
    chosen = {"registered_model": "cnn-pipeline", "alias": "champion", "onnx_sha256": "ab" * 32}
    client = mlflow.MlflowClient(mlflow_store)
    client.create_registered_model("cnn-pipeline")
    version = client.create_model_version("cnn-pipeline", workdir.as_uri(), tags={"pipeline.onnx_sha256": "cd" * 32})
    client.set_registered_model_alias("cnn-pipeline", "champion", version.version)
    assert sync.mirrored(db, "cnn-pipeline", set(), chosen) is False
    client.set_model_version_tag("cnn-pipeline", version.version, "pipeline.onnx_sha256", "ab" * 32)
    assert sync.mirrored(db, "cnn-pipeline", set(), chosen) is True
    client.delete_registered_model_alias("cnn-pipeline", "champion")
    assert sync.mirrored(db, "cnn-pipeline", set(), chosen) is False


def test_no_lock_means_nothing_to_mirror(workdir, capsys):
    sync.main([])
    assert "no dvc.lock yet" in capsys.readouterr().out


def test_an_unreadable_store_is_left_to_mlflow(tmp_path):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not a database")
    assert sync.mirrored(db, "cnn-pipeline", {"x"}, None) is None


def test_two_syncs_at_once_make_one_run_per_state(workdir, mlflow_store, tmp_path):
    """Parallel experiments finishing together: the store lock lets one make the run and the
    other find it. Each sync pauses between finding what is missing and making it, so without
    the lock both would make it, every time."""
    import os

    entry = lock_entry(workdir, "ingest", {"dvclive/ingest/metrics.json": '{"images": 3}'}, {})
    write_lock(workdir, {"ingest": entry})
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import time\n"
        "from pipeline.tracking import restore\n"
        "found = restore.Restorer.tagged\n"
        "restore.Restorer.tagged = lambda self: (found(self), time.sleep(3))[0]\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(REPO)])}
    procs = [subprocess.Popen([sys.executable, "-m", "pipeline", "sync"], cwd=workdir, env=env,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0], [p.stderr.read() for p in procs]
    assert len(stage_runs(mlflow_store)) == 1


def test_a_second_execution_of_one_commit_is_told_apart(mlflow_store):
    from pipeline.tracking import worker

    client = mlflow.MlflowClient(mlflow_store)
    experiment_id = client.create_experiment("cnn-pipeline")
    p = store.TrackingParams()
    first = worker.group_run(client, experiment_id, "host:1:1.00", "repro 20b81ab", p)
    again = worker.group_run(client, experiment_id, "host:1:1.00", "repro 20b81ab", p)  # the same driver
    second = worker.group_run(client, experiment_id, "host:2:2.00", "repro 20b81ab", p)
    assert first == again
    assert [client.get_run(r).info.run_name for r in (first, second)] == ["repro 20b81ab", "repro 20b81ab #2"]
