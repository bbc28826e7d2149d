"""MLflow faults: a server that does not answer, a wrong URI, a locked store, interrupted and
vanished stages, orphaned runs and scratch folders. Every stage ends with a bounded wait and
one line naming the store, and no run stays RUNNING or FINISHED when it was not."""

from __future__ import annotations

import dataclasses
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from helpers import assert_expected_failure, stage, stage_env
from support import TINY_PARAMS

from pipeline.errors import PipelineError, TrackingError
from pipeline.runtime import interrupts, workspace
from pipeline.tracking import connect, store, worker
from pipeline.tracking.run import stage_run

pytestmark = pytest.mark.slow  # stages in subprocesses; make test runs them, test-fast does not


def runs_of(uri: str) -> list:
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name(store.DEFAULT_EXPERIMENT)
    # stage runs only, not the parent run that groups one execution's stages
    return client.search_runs([experiment.experiment_id], "tags.stage LIKE '%'") if experiment else []


@pytest.fixture
def work(tmp_path) -> Path:
    (tmp_path / "params.yaml").write_text(TINY_PARAMS)
    return tmp_path


def test_an_unreachable_server_fails_the_stage_in_seconds_naming_the_uri(work):
    # port 9 (discard) refuses connections; MLflow's defaults retried for about four minutes
    done = stage(work, "ingest", env=stage_env(MLFLOW_TRACKING_URI="http://127.0.0.1:9"), timeout=120)
    assert_expected_failure(done, "cannot use the tracking store http://127.0.0.1:9 (MLFLOW_TRACKING_URI",
                            "tracking.offline_fallback", "MLflow logging failed")


def test_offline_fallback_logs_to_a_local_store_and_says_so(work):
    (work / "params.yaml").write_text(TINY_PARAMS + "tracking: {offline_fallback: true}\n")
    done = stage(work, "ingest", env=stage_env(MLFLOW_TRACKING_URI="http://127.0.0.1:9"), timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"logging this run to sqlite:///{work / store.OFFLINE_STORE} instead" in done.stderr
    (run,) = runs_of(f"sqlite:///{work / store.OFFLINE_STORE}")
    assert run.info.status == "FINISHED" and run.info.run_name == "ingest"


def test_a_wrong_sqlite_uri_names_the_variable(work):
    uri = f"sqlite:///{work}/params.yaml/mlflow.db"  # under a file: no folder can be made there
    done = stage(work, "ingest", env=stage_env(MLFLOW_TRACKING_URI=uri))
    assert_expected_failure(done, f"{uri} (MLFLOW_TRACKING_URI")


def test_a_briefly_locked_store_is_waited_for_not_failed(work, mlflow_store):
    """SQLite's own wait is 5 s; the lock is held for 8."""
    db = sqlite3.connect(mlflow_store.removeprefix("sqlite:///"), isolation_level=None, check_same_thread=False)
    db.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(8.0, db.execute, ["COMMIT"])
    release.start()
    try:
        done = stage(work, "ingest", env=stage_env(MLFLOW_TRACKING_URI=mlflow_store))
    finally:
        release.join()
        db.close()
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = runs_of(mlflow_store)
    assert run.info.status == "FINISHED" and run.data.metrics["images"] > 0


def test_the_retry_gives_up_after_its_bound_and_never_retries_other_errors():
    calls = []

    def locked_twice():
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "done"

    assert connect.retrying(locked_twice, wait_seconds=10) == "done" and len(calls) == 3
    with pytest.raises(RuntimeError, match="database is locked"):
        connect.retrying(lambda: (_ for _ in ()).throw(RuntimeError("database is locked")), wait_seconds=0.3)
    other = []
    with pytest.raises(ValueError):
        connect.retrying(lambda: other.append(1) or (_ for _ in ()).throw(ValueError("no")), 10)
    assert len(other) == 1


def test_ctrl_c_in_a_stage_ends_its_run_killed(workdir, mlflow_store):
    with pytest.raises(KeyboardInterrupt), stage_run("train", {}) as run:
        run.log_epoch(0, {"train/loss": 1.0})
        raise KeyboardInterrupt
    (info,) = runs_of(mlflow_store)
    assert info.info.status == "KILLED"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # not left ignored, nor in children


def test_ctrl_c_stops_a_stage_with_exit_130_one_line_and_a_killed_run(work, mlflow_store, prepared):
    """What Ctrl-C in a terminal does: SIGINT to the stage and its worker at once."""
    (work / "params.yaml").write_text(TINY_PARAMS.replace("epochs: 2,", "epochs: 400, early_stopping_patience: 0,"))
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--data", str(prepared)], cwd=work,
                            env=stage_env(MLFLOW_TRACKING_URI=mlflow_store), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    for _ in range(600):  # until epochs are running: Ctrl-C during start-up is another case
        runs = runs_of(mlflow_store)
        if runs and "train/loss" in runs[0].data.metrics:
            break
        time.sleep(0.2)
    os.killpg(proc.pid, 2)
    _, err = proc.communicate(timeout=120)
    assert_expected_failure(subprocess.CompletedProcess([], proc.returncode, "", err), "train: interrupted.",
                            "`dvc checkout train` restores", code=130)
    (info,) = runs_of(mlflow_store)
    assert info.info.status == "KILLED"
    assert not (work / "models").exists()  # nothing half-written


def test_a_stage_that_vanishes_leaves_a_killed_run_and_its_scratch_folder_is_swept(work, mlflow_store):
    script = ("import os, time; from pipeline.tracking.run import stage_run\n"
              "with stage_run('train', {}) as run:\n"
              "    run.log_epoch(0, {'loss': 1.0}); time.sleep(6); os.kill(os.getpid(), 9)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=work, env=stage_env(MLFLOW_TRACKING_URI=mlflow_store),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == -9
    for _ in range(100):  # the worker sees its stdin close and ends the run
        runs = runs_of(mlflow_store)
        if runs and runs[0].info.status != "RUNNING":
            break
        time.sleep(0.2)
    assert runs[0].info.status == "KILLED"
    import tempfile

    left = list(Path(tempfile.gettempdir()).glob(f"{store.SCRATCH_PREFIX}*-train-*"))
    store.remove_orphan_scratch()
    assert left and not any(p.exists() for p in left if not store.pid_alive(int(p.name.split("-")[2])))


def test_a_run_orphaned_with_its_worker_is_marked_killed_by_the_next_start(mlflow_store):
    import socket

    client = mlflow.MlflowClient(mlflow_store)
    experiment = client.create_experiment(store.DEFAULT_EXPERIMENT)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    def owned_by(pid: int):
        return client.create_run(experiment, tags={worker.HOST_TAG: socket.gethostname(),
                                                   worker.PID_TAG: str(pid)})

    orphan, live = owned_by(dead.pid), owned_by(os.getpid())
    mlflow.set_tracking_uri(mlflow_store)
    worker.mark_orphans_killed(client, experiment, store.TrackingParams())
    assert client.get_run(orphan.info.run_id).info.status == "KILLED"
    assert client.get_run(live.info.run_id).info.status == "RUNNING"  # its process is alive: still working


def test_scratch_folders_of_live_stages_are_kept(tmp_path):
    mine = tmp_path / f"{store.SCRATCH_PREFIX}{os.getpid()}-train-abc"
    gone = tmp_path / f"{store.SCRATCH_PREFIX}999999999-train-abc"
    for folder in (mine, gone):
        folder.mkdir()
    store.remove_orphan_scratch(tmp_path)
    assert mine.exists() and not gone.exists()


def test_a_failed_stage_keeps_the_previous_metrics_whole(workdir, mlflow_store):
    live = workdir / "dvclive" / "export"
    with stage_run("export@scratch", {}, live_dir=live) as run:
        run.log_summary({"onnx/max_abs_diff": 1.0e-7})
    before = (live / "metrics.json").read_bytes()
    with pytest.raises(PipelineError), stage_run("export@scratch", {}, live_dir=live) as run:
        raise PipelineError("onnx export disagrees")
    assert (live / "metrics.json").read_bytes() == before
    assert sorted(p.name for p in live.parent.iterdir()) == ["export"]  # no staging folder left


def test_a_worker_that_dies_stops_the_stage_at_its_next_call(workdir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir}/params.yaml/mlflow.db")
    with pytest.raises(TrackingError, match="its worker stopped"), stage_run("train", {}) as run:
        for epoch in range(600):  # the worker fails within seconds; the stage must not work on for minutes
            run.log_epoch(epoch, {"loss": 1.0})
            time.sleep(0.1)
    assert epoch < 590


@pytest.mark.parametrize("experiment", ["bared-grub", ""])
def test_a_failed_stage_of_an_experiment_fails_the_runs_its_earlier_stages_finished(
    workdir, mlflow_store, monkeypatch, experiment
):
    """DVC saves no experiment when a stage fails, so the experiment's finished runs fail with it;
    a plain `dvc repro` keeps them (DVC recorded their outputs), and another run's are untouched."""
    monkeypatch.setenv("DVC_EXP_NAME", experiment)
    with stage_run("ingest", {}):
        pass  # another driver: an earlier `dvc repro`
    monkeypatch.setattr(workspace, "_driver", dataclasses.replace(workspace.driver(), pid=1, started=1.0))
    with stage_run("prepare", {}):
        pass
    with pytest.raises(RuntimeError), stage_run("train", {}):
        raise RuntimeError("boom")
    tag = worker.FAILED_BY_TAG
    ended = {r.info.run_name: (r.info.status, r.data.tags.get(tag)) for r in runs_of(mlflow_store)}
    earlier = ("FAILED", "train") if experiment else ("FINISHED", None)
    assert ended == {"ingest": ("FINISHED", None), "prepare": earlier, "train": ("FAILED", None)}


@pytest.mark.parametrize("after", [0.15, 0.2, 0.25, 0.5, 1.0, 2.0])  # the worker imports in 0.1-0.3 s
def test_ctrl_c_during_start_up_is_one_line_and_exit_130(work, mlflow_store, prepared, after):
    """Ctrl-C while the stage and its MLflow worker are still importing: the same one-line
    message, and no traceback from either (only Python's own first ~40 ms are out of reach)."""
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--data", str(prepared)], cwd=work,
                            env=stage_env(MLFLOW_TRACKING_URI=mlflow_store), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(after)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert_expected_failure(subprocess.CompletedProcess([], proc.returncode, "", err), "train: interrupted.", code=130)
    assert not (work / "models").exists()


def test_a_ctrl_c_while_torch_imports_waits_for_the_import_to_end():
    """A KeyboardInterrupt inside torch's import can abort the process from C++ (exit -6, rare:
    the test above then fails): `interrupts.held` lets the block finish and delivers the
    signal after it, to the handler that was there before."""
    original = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        ran = []
        with pytest.raises(KeyboardInterrupt), interrupts.held():
            signal.raise_signal(signal.SIGINT)
            ran.append("the rest of the block")
        assert ran == ["the rest of the block"]
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # ignored before (fail() sets that): ignored after
        with interrupts.held():
            signal.raise_signal(signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, original)
