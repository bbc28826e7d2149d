"""`train.nproc` / `finetune.nproc` > 1: the stage under torchrun with DistributedDataParallel
over gloo on the CPU (slow: each run starts two ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from support import REPO, TINY_PARAMS, run

from pipeline.config import ConfigError
from pipeline.runtime import launch

PARAMS = TINY_PARAMS.replace("epochs: 2, batch_size: 64", "epochs: 3, batch_size: 64, nproc: 2").replace(
    "  batch_size: 64\nevaluate", "  batch_size: 64\n  nproc: 2\nevaluate")


def stage(work: Path, name: str, prepared: Path, out: str, check: bool = True):
    model = "scratch" if name == "train" else "finetune"
    cmd = [sys.executable, "-m", "pipeline", name, "--data", str(prepared), "--out", f"{out}/{model}",
           "--live", f"{out}/dvclive"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if check:
        return run(cmd, work, env)
    return subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=600)


def files_under(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def stage_runs(name: str) -> list:
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("cnn-pipeline")
    return client.search_runs([experiment.experiment_id], f"tags.stage = '{name}'")


@pytest.mark.slow
def test_two_gloo_processes_learn_write_one_set_of_outputs_and_rerun_byte_identically(tmp_path, prepared):
    (tmp_path / "params.yaml").write_text(PARAMS)
    stage(tmp_path, "train", prepared, "first")
    stage(tmp_path, "train", prepared, "second")
    first, second = files_under(tmp_path / "first"), files_under(tmp_path / "second")
    assert first == second  # weights, card, metrics and curves
    assert {Path(k).parts[0] for k in first} == {"scratch", "dvclive"}
    metrics = json.loads((tmp_path / "first" / "dvclive" / "metrics.json").read_text())
    assert metrics["best"]["val_acc"] > 0.7 and metrics["epochs_run"] == 3  # ten digits: chance is 0.1
    runs = stage_runs("train")  # rank 0 alone logs: one run per stage execution
    assert len(runs) == 2 and {r.data.tags["processes"] for r in runs} == {"2"}
    assert not list(tmp_path.glob(".checkpoints"))  # DDP runs do not checkpoint


@pytest.mark.slow
def test_the_finetune_runs_both_phases_under_torchrun(tmp_path, prepared):
    (tmp_path / "params.yaml").write_text(PARAMS)
    stage(tmp_path, "finetune", prepared, "out")
    assert (tmp_path / "out" / "finetune" / "model.pt").is_file()
    (r,) = stage_runs("finetune")
    assert r.info.status == "FINISHED" and r.data.tags["processes"] == "2"


@pytest.mark.slow
def test_an_expected_error_under_torchrun_is_one_message_and_exit_1(tmp_path, prepared):
    (tmp_path / "params.yaml").write_text(PARAMS)
    done = stage(tmp_path, "train", tmp_path / "missing", "out", check=False)
    lines = [line for line in done.stderr.splitlines() if line.strip() and "epoch/s" not in line]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert len(lines) == 2 and lines[0].startswith("error: ") and "missing: not found" in lines[0], lines


def test_nproc_is_checked_before_torchrun_starts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("train: {framework: keras, nproc: 2}\nfinetune: {nproc: 0}\n")
    with pytest.raises(ConfigError, match="train.nproc: 2 processes need framework torch"):
        launch.requested("train")
    with pytest.raises(ConfigError, match="finetune.nproc: expected an integer >= 1, got 0"):
        launch.requested("finetune")
    assert launch.requested("evaluate") == 1
