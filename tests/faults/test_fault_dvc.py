"""Faults under `dvc repro`, in a temporary git + DVC copy of the project on the tiny params:
a damaged cache object, a params typo, an export that drifts, Ctrl-C and SIGKILL in a
stage. Each case asserts the exit, the message, that dvc.lock is unchanged and that what DVC
deleted comes back with the command the message gives."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from helpers import REPO, assert_expected_failure, snapshot, stage
from support import TINY_PARAMS, copy_project, mlflow_server, run

from pipeline.runtime import cpu_share

# one worker builds and shares `project` (module fixtures are per worker)
pytestmark = [pytest.mark.slow, pytest.mark.e2e, pytest.mark.xdist_group("faults-dvc")]


@pytest.fixture(scope="session")  # a module fixture is rebuilt each time a worker comes back to the module
def project(tmp_path_factory, _migrated_store) -> tuple[Path, dict]:
    repo = tmp_path_factory.mktemp("faults-repo")
    env = copy_project(repo, _migrated_store)
    for cmd in (["dvc", "repro", "export@scratch"], ["git", "add", "-A"], ["git", "commit", "-qm", "run"]):
        run(cmd, repo, env)
    return repo, env


@pytest.fixture
def repo(project) -> tuple[Path, dict]:
    """The project as committed, with its outputs as dvc.lock records them."""
    path, env = project
    run(["git", "checkout", "-q", "--", "."], path, env)
    run(["git", "clean", "-qfd", "-e", "mlflow.db", "-e", "mlartifacts"], path, env)
    run(["dvc", "checkout", "-q", "--force", "--with-deps", "export@scratch"], path, env)
    return path, env


def dvc(repo: Path, env: dict, *args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(["dvc", *args], cwd=repo, env=env, capture_output=True, text=True, timeout=600, **kwargs)


def last_run(repo: Path, name: str):
    client = mlflow.MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("cnn-pipeline")
    runs = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0]


def test_a_damaged_cache_object_stops_the_reader_naming_the_file(repo):
    path, env = repo
    lock = (path / "dvc.lock").read_bytes()
    model = path / "models/scratch/model.pt"
    cached = path / ".dvc/cache/files/md5" / (digest := hashlib.md5(model.read_bytes()).hexdigest())[:2] / digest[2:]
    data = bytearray(cached.read_bytes())
    data[len(data) // 2] ^= 0xFF
    os.chmod(cached, 0o644)
    cached.write_bytes(bytes(data))
    shutil.rmtree(path / "models/scratch")
    run(["dvc", "checkout", "models/scratch"], path, env)  # DVC links the damaged object back unverified
    done = dvc(path, env, "repro", "-f", "-s", "export@scratch")
    assert done.returncode != 0
    assert_expected_failure(subprocess.CompletedProcess([], 1, "", done.stderr.split("ERROR:")[0]),
                            "models/scratch/model.pt: its content differs from the sha256",
                            "rebuild it with `dvc repro -f -s train`")
    assert (path / "dvc.lock").read_bytes() == lock
    # the fix the message gives works: the rebuild writes the same bytes, and the reader runs
    run(["dvc", "repro", "-f", "-s", "train"], path, env)
    run(["dvc", "repro", "-f", "-s", "export@scratch"], path, env)
    assert (path / "dvc.lock").read_bytes() == lock


def test_a_params_typo_fails_before_work_and_dvc_checkout_restores_the_model(repo):
    path, env = repo
    lock, before = (path / "dvc.lock").read_bytes(), snapshot(path / "models/scratch")
    (path / "params.yaml").write_text(TINY_PARAMS.replace("lr: 3.0e-3", "lr: 3.0e-3, optimiser: sgd"))
    done = dvc(path, env, "repro", "train")
    text = done.stderr.split("ERROR:")[0]
    assert_expected_failure(subprocess.CompletedProcess([], 1, "", text), "train: unknown keys ['optimiser']",
                            "`dvc checkout train` restores")
    assert (path / "dvc.lock").read_bytes() == lock
    run(["dvc", "checkout", "train"], path, env)
    assert snapshot(path / "models/scratch") == before


def test_an_export_that_drifts_is_refused_and_the_previous_one_restored(repo):
    path, env = repo
    lock = (path / "dvc.lock").read_bytes()
    before = snapshot(path / "exports/scratch")
    metrics = (path / "dvclive/export/scratch/metrics.json").read_bytes()
    drifting = TINY_PARAMS.replace("export: {opset: 18,", "export: {max_abs_diff: 1.0e-12, opset: 18,")
    (path / "params.yaml").write_text(drifting)
    done = dvc(path, env, "repro", "export@scratch")
    assert_expected_failure(subprocess.CompletedProcess([], 1, "", done.stderr.split("ERROR:")[0]),
                            "export of models/scratch disagrees with the torch model", "max_abs_diff 1e-12",
                            "`dvc checkout export@scratch` restores")
    assert (path / "dvc.lock").read_bytes() == lock
    run(["dvc", "checkout", "export@scratch"], path, env)
    run(["git", "checkout", "--", "dvclive"], path, env)
    assert snapshot(path / "exports/scratch") == before
    assert (path / "dvclive/export/scratch/metrics.json").read_bytes() == metrics


def stage_pid(name: str, under: int, timeout: float = 120) -> int:
    """The pid of stage `name` that the DVC process `under` started: only its descendants, as
    other tests (pytest-xdist's other worker) run stages of the same name at the same time."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            children = psutil.Process(under).children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for proc in children:
            try:
                cmd = proc.cmdline()
            except psutil.Error:
                continue
            if cmd[-2:] == ["pipeline", name] or cmd[1:4] == ["-m", "pipeline", name]:
                return proc.pid
        time.sleep(0.1)
    raise AssertionError(f"no {name} stage started")


@pytest.mark.parametrize("how", ["sigint", "sigkill"])
def test_an_interrupted_stage_is_killed_in_mlflow_and_its_outputs_come_back(repo, how):
    path, env = repo
    lock, before = (path / "dvc.lock").read_bytes(), snapshot(path / "models/scratch")
    long = TINY_PARAMS.replace("epochs: 2,", "epochs: 400, early_stopping_patience: 0,")  # long enough to interrupt
    (path / "params.yaml").write_text(long)
    proc = subprocess.Popen(["dvc", "repro", "train"], cwd=path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    pid = stage_pid("train", proc.pid)
    for _ in range(600):  # until epochs are running: Ctrl-C during start-up is another case
        running = last_run(path, "train")
        if running.info.status == "RUNNING" and "train/loss" in running.data.metrics:
            break
        time.sleep(0.2)
    if how == "sigint":
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
    else:
        os.kill(pid, signal.SIGKILL)  # the stage alone: the OOM killer's way
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in err, err[-3000:]  # DVC stops without waiting for the stage's own line
    for _ in range(100):
        status = last_run(path, "train").info.status
        if status != "RUNNING":
            break
        time.sleep(0.2)
    assert status == "KILLED"
    assert (path / "dvc.lock").read_bytes() == lock
    run(["git", "checkout", "--", "params.yaml"], path, env)
    run(["dvc", "checkout", "train"], path, env)
    assert snapshot(path / "models/scratch") == before



def test_two_exp_runs_in_one_workspace_fail_loudly_and_save_nothing(repo):
    """The issue's probe: a second `dvc exp run` while the first trains. DVC writes the second's
    -S value into params.yaml before any stage runs (DVC's own lock then stops the second); the
    first must not record its model beside those params, nor leave a finished run."""
    path, env = repo
    lock = (path / "dvc.lock").read_bytes()
    first = subprocess.Popen(["dvc", "exp", "run", "-S", "train.epochs=60",
                              "-S", "+train.early_stopping_patience=0", "train"], cwd=path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stage_pid("train", first.pid)
    for _ in range(600):
        running = last_run(path, "train")
        if running.info.status == "RUNNING" and "train/loss" in running.data.metrics:
            break
        time.sleep(0.2)
    second = dvc(path, env, "exp", "run", "-S", "train.lr=0.5", "train")
    assert second.returncode != 0 and "Traceback" not in second.stderr, second.stderr[-3000:]
    assert "is busy" in second.stderr, second.stderr[-3000:]
    _, err = first.communicate(timeout=300)
    assert first.returncode != 0
    assert "Traceback" not in err, err[-3000:]
    assert "params.yaml changed while this run (`dvc exp run -S train.epochs=60" in err, err[-3000:]
    assert "dvc exp run --queue" in err
    assert (path / "dvc.lock").read_bytes() == lock  # nothing recorded beside params it was not trained with
    assert dvc(path, env, "exp", "list", "--name-only").stdout.strip() == ""
    name = last_run(path, "train").data.tags["dvc_exp_name"]
    client = mlflow.MlflowClient(f"sqlite:///{path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cnn-pipeline").experiment_id],
                              f"tags.dvc_exp_name = '{name}'")
    assert [(r.info.run_name, r.info.status) for r in runs] == [("train", "FAILED")]


def test_two_exp_runs_started_together_cannot_train_on_each_others_params(repo):
    """The race of two `dvc exp run` started in the same second, made certain: the first run's
    stage is held at its workspace claim (this test holds the claim's lock) until the second
    has written its -S value into params.yaml and been stopped by DVC's lock. The first must
    then refuse before any work, in one line pointing at the queue, and save nothing."""
    import fcntl

    path, env = repo
    lock = (path / "dvc.lock").read_bytes()
    claim_lock = path / ".dvc/tmp/pipeline-workspace.lock"
    claim_lock.parent.mkdir(parents=True, exist_ok=True)
    with open(claim_lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        first = subprocess.Popen(["dvc", "exp", "run", "-n", "c1", "-S", "train.lr=0.002", "train"], cwd=path,
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stage_pid("train", first.pid)  # DVC holds its lock and runs the stage, which waits for the claim
        second = dvc(path, env, "exp", "run", "-n", "c2", "-S", "train.lr=0.004", "train")
        assert second.returncode != 0 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert "is busy" in second.stderr, second.stderr[-3000:]  # DVC's lock, after writing params.yaml:
        assert "lr: 0.004" in (path / "params.yaml").read_text()
    _, err = first.communicate(timeout=300)
    assert first.returncode != 0
    assert_expected_failure(subprocess.CompletedProcess([], 1, "", err.split("ERROR:")[0]),
                            "params.yaml does not hold this run's -S values: train.lr is 0.004 in params.yaml, not "
                            "0.002", "dvc exp run -n c1 -S train.lr=0.002", "dvc exp run --queue")
    assert (path / "dvc.lock").read_bytes() == lock
    assert dvc(path, env, "exp", "list", "--name-only").stdout.strip() == ""
    client = mlflow.MlflowClient(f"sqlite:///{path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cnn-pipeline").experiment_id])
    assert [r.info.run_name for r in runs if r.data.tags.get("dvc_exp_name") in ("c1", "c2")] == []  # refused
    # before its run opened: nothing recorded against either's params


def test_a_stage_refuses_a_workspace_another_live_run_holds(repo):
    """The other half: a stage whose workspace another live dvc process has claimed (here a
    stand-in process) refuses before any work, pointing to the queue; a claim whose process has
    gone is taken over."""
    import psutil

    path, env = repo
    before = snapshot(path / "models/scratch")
    holder = subprocess.Popen(["sleep", "120"])
    try:
        started = psutil.Process(holder.pid).create_time()
        claim = {"driver": "x", "host": socket.gethostname(), "pid": holder.pid, "started": started, "params": "",
                 "command": "dvc exp run -S train.lr=0.1"}
        claim_file = path / ".dvc/tmp/pipeline-workspace.json"
        claim_file.write_text(json.dumps(claim))
        done = stage(path, "train", env={**env, "PYTHONPATH": str(REPO)})
        assert_expected_failure(done, "in use by another run: `dvc exp run -S train.lr=0.1`", f"pid {holder.pid}",
                                "dvc exp run --queue")
        assert snapshot(path / "models/scratch") == before
    finally:
        holder.kill()
        holder.wait()
    done = stage(path, "train", env={**env, "PYTHONPATH": str(REPO)})  # the holder is gone: its claim is stale
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(claim_file.read_text())["pid"] != holder.pid


@pytest.fixture
def store(request, tmp_path):
    """An MLflow store no worker found made: a fresh SQLite file, or a real `mlflow server` on a
    free localhost port (its own SQLite backend and artifact folder)."""
    if request.param == "sqlite":
        (tmp_path / "fresh").mkdir()
        yield f"sqlite:///{tmp_path / 'fresh' / 'mlflow.db'}"
        return
    with mlflow_server(tmp_path / "server") as uri:
        yield uri


@pytest.mark.parametrize(("store", "count"), [("sqlite", 6), ("server", 4)], indirect=["store"])
def test_experiments_two_at_a_time_all_land_once_each_in_one_store(repo, store, count):
    """The README's way to run many experiments, `python -m pipeline.experiments.batch -j 2`,
    into a store neither worker found made (a fresh SQLite file both create and migrate at once,
    or a tracking server): every experiment lands, with a line saying so, and the store holds
    exactly one FINISHED stage run for each, with its own params and metrics, under a parent run
    of its own."""
    repo, env = repo
    run(["git", "checkout", "-q", "--", "params.yaml"], repo, env)
    env = {**env, "MLFLOW_TRACKING_URI": store}
    prefix = f"many-{count}"  # experiment names are unique in a repository
    seeds = {f"{prefix}-{i}": 10 + i for i in range(1, count + 1)}
    done = subprocess.run([sys.executable, "-m", "pipeline.experiments.batch", "-j", "2", "--name", prefix,
                           "-S", "train.seed=" + ",".join(map(str, seeds.values())), "-S", "runtime.threads=auto",
                           "-S", "+runtime.portable=false", "train"],  # the train stage alone: what the store needs
                          cwd=repo, env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(seeds) and all(line.endswith("Success") for line in lines)
    ran = {name: name + "-again" if name + "-again" in done.stderr else name for name in seeds}  # lost: requeued once

    shown = json.loads(run(["dvc", "exp", "show", "--json"], repo, env).stdout)
    listed = [exp.get("name") for base in shown for exp in base.get("experiments") or []]
    run(["dvc", "exp", "remove", *ran.values()], repo, env)  # the other cases expect no experiment
    run(["dvc", "queue", "remove", "--all"], repo, env)
    assert sorted(n for n in listed if n in ran.values()) == sorted(ran.values())
    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name("cnn-pipeline")
    every = client.search_runs([experiment.experiment_id], "tags.stage LIKE '%'", max_results=1000)
    finished = sorted((r.data.tags["dvc_exp_name"], r.data.tags["stage"], r.info.status) for r in every)
    # train needs the audit's applied.csv, and the audit reads the runtime section: both ran for each
    assert finished == sorted((n, s, "FINISHED") for n in ran.values() for s in ("audit", "train"))  # none lost
    runs = [r for r in every if r.data.tags["stage"] == "train"]
    parents = set()
    for r in runs:
        name = r.data.tags["dvc_exp_name"]
        assert r.data.params["train.seed"] == str(seeds[name.removesuffix("-again")]), name  # its own params
        assert "train/loss" in r.data.metrics and "best/val_acc" in r.data.metrics, name
        parent = client.get_run(r.data.tags["mlflow.parentRunId"])
        assert parent.data.tags.get("pipeline.group") == "true" and parent.info.run_name.startswith(name)
        parents.add(parent.info.run_id)
    assert len(parents) == count
    # two ran at once: auto shared the cores between the two workers
    assert {r.data.tags["threads"] for r in runs} >= {str(cpu_share.auto_threads(workers=2))}
    assert {r.data.params["runtime.threads"] for r in runs} == {"auto"}  # with runtime.portable: false, added by -S +
