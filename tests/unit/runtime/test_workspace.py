"""The workspace claim: one `dvc repro` / `dvc exp run` per folder, never left stale."""

from __future__ import annotations

import json
import os
import socket
import subprocess

import psutil
import pytest

from pipeline.runtime import workspace
from pipeline.runtime.workspace import WorkspaceBusy


@pytest.fixture
def repo(tmp_path):
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "params.yaml").write_text("train: {lr: 0.1}\n")
    return tmp_path


def write_claim(repo, pid: int, started: float, command: str = "dvc exp run -S train.lr=0.2") -> None:
    record = {"driver": f"{socket.gethostname()}:{pid}:{started:.2f}", "host": socket.gethostname(), "pid": pid,
              "started": started, "command": command, "params": ""}
    (repo / workspace.CLAIM_FILE).parent.mkdir(parents=True, exist_ok=True)
    (repo / workspace.CLAIM_FILE).write_text(json.dumps(record))


def held(repo) -> dict:
    return json.loads((repo / workspace.CLAIM_FILE).read_text())


@pytest.mark.parametrize(
    ("cmdline", "dvc", "shown"),
    [
        (["/venv/bin/python3.11", "/venv/bin/dvc", "exp", "run", "-S", "a=1"], True, "dvc exp run -S a=1"),
        (["/venv/bin/dvc", "repro"], True, "dvc repro"),
        (["python", "-m", "dvc", "repro"], True, "dvc repro"),
        (["python", "-m", "pipeline", "train"], False, "python -m pipeline train"),
        (["/bin/sh", "-c", "python -m pipeline train"], False, "/bin/sh -c python -m pipeline train"),
    ],
)
def test_the_driver_is_the_dvc_process_shown_as_typed(cmdline, dvc, shown):
    assert workspace.is_dvc(cmdline) is dvc
    assert workspace.command(cmdline) == shown


def test_outside_a_dvc_repository_nothing_is_claimed(tmp_path):
    workspace.claim(tmp_path)
    workspace.check_unchanged()
    assert not (tmp_path / ".dvc").exists()


def test_a_driver_claims_once_and_params_must_not_change_under_it(repo):
    workspace.claim(repo)
    first = held(repo)
    assert first["driver"] == workspace.driver().key and first["pid"] == workspace.driver().pid
    workspace.claim(repo)  # its next stage
    assert held(repo) == first
    (repo / "params.yaml").write_text("train: {lr: 0.2}\n")  # what a second `dvc exp run -S` does
    with pytest.raises(WorkspaceBusy, match=r"params.yaml changed while this run .*dvc exp run --queue"):
        workspace.check_unchanged()
    with pytest.raises(WorkspaceBusy, match="params.yaml changed"):
        workspace.claim(repo)


def test_a_live_claim_refuses_and_a_dead_or_reused_pid_frees_it(repo):
    holder = subprocess.Popen(["sleep", "60"])
    started = psutil.Process(holder.pid).create_time()
    try:
        write_claim(repo, holder.pid, started)
        busy = rf"in use by another run: `dvc exp run -S train.lr=0.2` \(pid {holder.pid}"
        with pytest.raises(WorkspaceBusy, match=busy):
            workspace.claim(repo)
        write_claim(repo, holder.pid, started - 100)  # the same pid, but not the process that claimed
        workspace.claim(repo)
        assert held(repo)["pid"] == workspace.driver().pid
    finally:
        holder.kill()
        holder.wait()
    write_claim(repo, holder.pid, started)  # gone: a killed run leaves no stale lock
    workspace.claim(repo)
    assert held(repo)["pid"] == workspace.driver().pid


def test_a_claim_from_another_host_counts_as_live(repo):
    write_claim(repo, os.getpid(), 0.0)
    record = held(repo) | {"host": "elsewhere"}
    (repo / workspace.CLAIM_FILE).write_text(json.dumps(record))
    with pytest.raises(WorkspaceBusy, match="on elsewhere.*if no such run exists, delete"):
        workspace.claim(repo)


@pytest.mark.parametrize(
    ("cmdline", "found"),
    [
        (["/venv/bin/dvc", "exp", "run", "-n", "c1", "-S", "train.lr=0.002"], (("train.lr", "0.002"),)),
        (["python", "-m", "dvc", "exp", "run", "-Strain.lr=1e-3", "--set-param", "data.folder=a b"],
         (("train.lr", "1e-3"), ("data.folder", "a b"))),
        (["dvc", "exp", "run", "--set-param=params.yaml:train.seed=3", "-S", "other.yaml:x=1", "-S", "+y.z=2"],
         (("train.seed", "3"), ("y.z", "2"))),
        (["dvc", "exp", "run", "-S", "~train.lr"], ()),  # a deletion
        (["dvc", "exp", "run", "--queue", "-S", "train.lr=0.002"], ()),  # runs in a copy of its own
        (["dvc", "repro"], ()),
        (["python", "-m", "pipeline", "train", "-S", "train.lr=1"], ()),  # not DVC
    ],
)
def test_the_set_params_of_an_experiment_are_read_from_its_command_line(cmdline, found):
    assert workspace.set_params(cmdline) == found


def test_a_value_is_unmet_only_when_params_yaml_surely_holds_another():
    params = {"train": {"lr": 0.004, "epochs": "auto", "calibrate": False}, "data": {"folder": "x"}}
    assert workspace.unmet(params, (("train.lr", "0.002"),)) == ["train.lr is 0.004 in params.yaml, not 0.002"]
    met = (("train.lr", "4e-3"), ("train.epochs", "auto"), ("train.calibrate", "false"), ("data.folder", "x"))
    assert workspace.unmet(params, met) == []
    assert workspace.unmet(params, (("train.lr", "0.1"), ("train.lr", "0.004"))) == []  # the last one counts
    doubtful = (("train.missing", "1"), ("nope.lr", "1"), ("train.lr", "0.1,0.2"), ("train.lr", "[unclosed"))
    assert workspace.unmet(params, doubtful) == []


def test_an_experiment_whose_values_another_overwrote_is_refused_before_any_work(repo, monkeypatch):
    me = workspace.driver()
    monkeypatch.setattr(workspace, "_driver", workspace.Driver(
        me.host, me.pid, me.started, "dvc exp run -n c1 -S train.lr=0.002", (("train.lr", "0.002"),)))
    said = (r"^params.yaml does not hold this run's -S values: train.lr is 0.1 in params.yaml, not 0.002\. "
            r"Another `dvc exp run` wrote its own in between .*dvc exp run --queue")
    with pytest.raises(WorkspaceBusy, match=said):
        workspace.claim(repo)
    assert not (repo / workspace.CLAIM_FILE).exists()  # refused before claiming
    (repo / "params.yaml").write_text("train: {lr: 0.002}\n")
    workspace.claim(repo)  # its own values: claimed
    assert held(repo)["command"] == "dvc exp run -n c1 -S train.lr=0.002"
