"""Resumable training: a stage killed with SIGKILL at any point and rerun carries on from its
last epoch's checkpoint and ends byte-identical to a run that was never interrupted (slow)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
from support import REPO, TINY_PARAMS, run

from pipeline.runtime import checkpoints

pytestmark = pytest.mark.slow

# six epochs without early stopping: room to be killed between epochs, mid-epoch, mid-save
PARAMS = TINY_PARAMS.replace("epochs: 2, batch_size: 64", "epochs: 8, batch_size: 64, early_stopping_patience: 0")
# phase 2 alone checkpoints (the probe is recomputed): six epochs leave room for the kills' writes
FINETUNE = ("  epochs: 1\n", "  epochs: 6\n  early_stopping_patience: 0\n")


def stage_cmd(stage: str, prepared: Path) -> list[str]:
    model = "scratch" if stage == "train" else "finetune"
    return [sys.executable, "-m", "pipeline", stage, "--data", str(prepared), "--out", f"models/{model}",
            "--live", f"dvclive/{stage}"]


def outputs(work: Path, stage: str) -> dict[str, bytes]:
    model = "scratch" if stage == "train" else "finetune"
    folders = [work / "models" / model, work / "dvclive" / stage]
    return {str(p.relative_to(work)): p.read_bytes() for f in folders for p in sorted(f.rglob("*")) if p.is_file()}


def fresh(tmp_path: Path, name: str, params: str) -> tuple[Path, dict]:
    work = tmp_path / name
    work.mkdir()
    (work / "params.yaml").write_text(params)
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"]}
    return work, env


def train_runs(stage: str) -> list:
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("cnn-pipeline")
    return client.search_runs([experiment.experiment_id], f"tags.stage = '{stage}'", order_by=["start_time ASC"])


def saves(work: Path) -> set[tuple[str, int]]:
    """Each checkpoint write seen so far: (file, modification time); a write replaces the file."""
    found = set()
    for path in (work / checkpoints.FOLDER).rglob("*"):
        if path.suffix not in (".pt", ".npz"):  # torch's and Keras' checkpoints, not their temporary files
            continue
        try:
            found.add((path.name, path.stat().st_mtime_ns))
        except FileNotFoundError:  # replaced between the listing and the stat
            pass
    return found


def kill_after(cmd: list[str], work: Path, env: dict, writes: int, delay: float) -> None:
    """Start the stage; SIGKILL it (and its MLflow worker) `delay` seconds after it has
    written `writes` checkpoints: inside the next epoch, or inside the next write."""
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    seen: set = set()
    before = saves(work)
    deadline = time.monotonic() + 300
    while len(seen) < writes and proc.poll() is None and time.monotonic() < deadline:
        seen |= saves(work) - before
        time.sleep(0.005)
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# Keras (train.framework: keras) starts TensorFlow in each run (~10 s): one kill mid-training
KILLS = {"train": 2, "finetune": 2, "keras": 1}


@pytest.mark.parametrize("case", ["train", "finetune", "keras"])
def test_killed_at_random_points_and_rerun_it_ends_byte_identical(case, tmp_path, prepared):
    stage = "finetune" if case == "finetune" else "train"
    params = PARAMS.replace(*FINETUNE)
    if case == "keras":
        params = params.replace("framework: torch", "framework: keras")
    reference, env = fresh(tmp_path, "reference", params)
    run(stage_cmd(stage, prepared), reference, env)
    expected = outputs(reference, stage)
    assert not (reference / checkpoints.FOLDER).exists()  # a finished stage leaves no checkpoint

    work, env = fresh(tmp_path, "killed", params)
    rng = random.Random(f"{case}-kill-points")
    kill_after(stage_cmd(stage, prepared), work, env, writes=0, delay=rng.uniform(0.5, 3.0))  # during start-up
    for _ in range(KILLS[case]):  # then more, each one or two epochs on and a random moment into the next
        kill_after(stage_cmd(stage, prepared), work, env, writes=rng.randint(1, 2), delay=rng.uniform(0, 0.3))
    assert saves(work), "no checkpoint was left to resume from"
    done = run(stage_cmd(stage, prepared), work, env)
    assert outputs(work, stage) == expected  # weights, model card, metrics and every curve
    assert not (work / checkpoints.FOLDER).exists()
    last = train_runs(stage)[-1]
    assert int(last.data.tags["resumed_from_epoch"]) >= KILLS[case]
    linked = last.data.tags["resumed_from_run"]
    client = mlflow.MlflowClient(os.environ["MLFLOW_TRACKING_URI"])  # not the URI another test set in-process
    assert client.get_run(linked).data.tags["resumed_by_run"] == last.info.run_id
    assert "Resumed at epoch" in last.data.tags["mlflow.note.content"]
    # the resumed run's own history is the whole curve, the epochs before the kill included
    history = client.get_metric_history(last.info.run_id, "val/loss")
    assert sorted(m.step for m in history) == list(range(len(history))) and len(history) >= 3
    assert "error" not in done.stderr.lower()


def test_a_checkpoint_of_other_params_is_never_resumed(tmp_path, prepared):
    work, env = fresh(tmp_path, "work", PARAMS)
    proc = subprocess.Popen(stage_cmd("train", prepared), cwd=work, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not any((work / checkpoints.FOLDER).rglob("fit.pt")) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (left,) = (work / checkpoints.FOLDER / "train").iterdir()

    (work / "params.yaml").write_text(PARAMS.replace("lr: 3.0e-3", "lr: 1.0e-2"))
    run(stage_cmd("train", prepared), work, env)
    assert "resumed_from_epoch" not in train_runs("train")[-1].data.tags
    assert left.is_dir()  # the other params' checkpoint is kept, under its own key, for its own rerun
    (work / "params.yaml").write_text(PARAMS)
    run(stage_cmd("train", prepared), work, env)
    assert int(train_runs("train")[-1].data.tags["resumed_from_epoch"]) >= 1
