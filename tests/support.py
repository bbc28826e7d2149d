"""What tests share beyond fixtures: the tiny params, running commands and stages, small data,
a copy of the project as a git + DVC repository, a local server's port. Test modules import
these from here (`from support import ...`); conftest.py holds only fixtures and hooks."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# Small enough that a stage runs in seconds; real data (the bundled digits) all the same. One
# thread: the suite runs two pytest-xdist workers on two cores, and two 2-thread stages at once
# oversubscribe them: OpenMP's spinning waits then made a 30 s fine-tune test take 706 s.
TINY_PARAMS = """\
runtime: {threads: 1, device: cpu}
data: {source: digits, folder: data/sources, root: data/sources}
prepare: {seed: 0, image_size: 16, val_fraction: 0.15, test_fraction: 0.15}
audit: {input_size: 32, folds: 2}
train: {framework: torch, seed: 0, epochs: 2, batch_size: 64, lr: 3.0e-3}
finetune:
  seed: 0
  input_size: 32
  epochs: 1
  unfreeze_fraction: 0.1
  batch_size: 64
evaluate: {batch_size: 256}
# int8 agreement 0.8: the tiny fine-tune (the probe and one epoch at 32 px) reaches 0.91 test accuracy,
# where int8 flips near-ties (agreement 0.96; at 16 px its probe is near chance, 0.38, and agreement 0.71);
# the scratch CNN's int8 file is held to the default 0.98 in test_stages
export: {opset: 18, batch_size: 256, latency_runs: 3, throughput_runs: 0, int8_min_top1_agreement: 0.8}
register: {}
crossval: {folds: 0}
"""


def shared_folder(tmp_path_factory, name: str, step: str, build: Callable[[Path], None]) -> Path:
    """A folder all pytest-xdist workers share, where `build` has run once: the first worker to
    ask runs it while the others wait for it (each building its own would cost every worker
    the same minutes). Consumers read it and write nowhere inside it but their own outputs."""
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's, above each worker's
    folder, done = root / name, root / f"{name}.{step}.done"
    folder.mkdir(exist_ok=True)
    with open(root / f"{name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            build(folder)
            done.touch()
    return folder


def stage_env(work: Path | None = None, **extra: str) -> dict[str, str]:
    """The environment a stage runs in from a test: this checkout on PYTHONPATH, the venv's python
    and dvc first, no PIPELINE_DEBUG; the SQLite store in `work` when given; then `extra`."""
    env = {k: v for k, v in os.environ.items() if k != "PIPELINE_DEBUG"}
    env["PYTHONPATH"] = str(REPO)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    if work is not None:
        env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    return {**env, **extra}


def run(cmd: list[str], cwd: Path, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run a command; on failure show its stdout and stderr in the assertion."""
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, (
        f"{' '.join(cmd)} exited {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    )
    return done


def digit_folder(root, per_class: int = 12) -> None:
    """The digits 0-3 as a folder of mixed formats and modes, the way users' folders are."""
    from PIL import Image

    from pipeline.data.sources import standard

    pixels, labels = standard.read_array_dataset("digits", None).splits[""]
    counts: dict[int, int] = {}
    for image, label in zip(pixels, labels, strict=True):
        if label > 3 or counts.get(label, 0) >= per_class:
            continue
        i = counts[label] = counts.get(label, 0) + 1
        path = root / f"digit{label}" / f"{i:03d}"
        path.parent.mkdir(parents=True, exist_ok=True)
        big = Image.fromarray(image).resize((24, 16))  # not square: resize: pad applies
        match i % 4:
            case 0:
                big.save(path.with_suffix(".png"))
            case 1:
                big.convert("RGB").save(path.with_suffix(".jpg"), quality=95)
            case 2:
                Image.fromarray(np.asarray(big).astype(np.uint16) * 257).save(path.with_suffix(".tif"))  # 16-bit
            case 3:
                big.convert("LA").save(path.with_suffix(".png"))


def save_splits(out: Path, splits: dict) -> None:
    """Prepared data as prepare writes it (`<split>_images.npy`, `<split>_labels.npy`,
    `classes.json`, `SHA256SUMS`), from in-memory `formats.Split`s: the engine tests' own small data."""
    from pipeline import files

    out.mkdir(parents=True, exist_ok=True)
    for name, split in splits.items():
        np.save(out / f"{name}_images.npy", np.ascontiguousarray(split.images))
        np.save(out / f"{name}_labels.npy", split.labels.astype(np.int64))
    files.write_json(out / "classes.json", list(next(iter(splits.values())).classes))
    files.write_checksums(out)


PROJECT_FILES = ("pipeline/", ".dvc/", "data/sources/", "data/review/")  # with dvc.yaml, .dvcignore, .gitignore


def copy_project(dest: Path, store: Path, params: str = TINY_PARAMS) -> dict[str, str]:
    """A git + DVC repository at `dest` holding this project's tracked pipeline files, `params`
    and a copy of the MLflow `store` (the default one: SQLite in the repository root), with
    everything under `dest` committed; returns the environment to run DVC in (the venv's dvc)."""
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True)
    for rel in listed.stdout.split():
        if rel.startswith(PROJECT_FILES) or rel in {"dvc.yaml", ".dvcignore", ".gitignore"}:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / rel, dest / rel)
    (dest / "params.yaml").write_text(params)
    shutil.copy(store, dest / "mlflow.db")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH", "PIPELINE_DEBUG")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the venv's python and dvc
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "baseline"]):
        run(cmd, dest, env)
    return env


def free_port() -> int:
    """A localhost port nothing listens on now (for a server a test starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, proc: subprocess.Popen, seconds: float = 180) -> None:
    """Poll `url` until it answers; fail with the server's output if it exits or takes too long."""
    import time
    import urllib.request

    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, f"{url} did not answer in {seconds:.0f} s"
            time.sleep(0.5)


@contextmanager
def mlflow_server(home: Path) -> Iterator[str]:
    """`mlflow server` on a free localhost port, its SQLite backend and artifacts under `home`
    (created): its URL while the block runs, then stopped."""
    port = free_port()
    home.mkdir(parents=True, exist_ok=True)
    with _serving([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
                   "--artifacts-destination", str(home / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
                   "--workers", "1"], "/health", port, seconds=120, cwd=home) as url:
        yield url


@contextmanager
def served_model(model_uri: str, env: dict[str, str]) -> Iterator[str]:
    """`mlflow models serve -m model_uri` (the venv's interpreter, its PATH first: the server starts
    uvicorn from PATH) on a free localhost port: its URL while the block runs, then stopped."""
    port = free_port()
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    with _serving([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
                   "--host", "127.0.0.1", "--port", str(port)], "/ping", port, env=env) as url:
        yield url


@contextmanager
def _serving(cmd: list[str], probe: str, port: int, seconds: float = 180, **popen) -> Iterator[str]:
    """A server in its own session, until `probe` answers; SIGTERM to its group at the end."""
    import signal

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True, **popen)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url + probe, proc, seconds)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def lock_entry(work, stage: str, files: dict[str, str], params: dict) -> dict:
    """Write `files` under `work` and return the dvc.lock entry DVC would record for them."""
    from pipeline.tracking import lockfile

    outs = []
    for rel, text in files.items():
        (work / rel).parent.mkdir(parents=True, exist_ok=True)
        (work / rel).write_text(text)
        outs.append({"path": rel, "hash": "md5", "md5": lockfile.file_md5(work / rel), "size": len(text)})
    return {"cmd": f"python -m pipeline {stage}", "params": {"params.yaml": params}, "outs": outs}


def write_lock(work, stages: dict) -> None:
    import yaml

    (work / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}, sort_keys=False))


def tiny_export(folder: Path) -> Path:
    """An export folder whose ONNX model classifies 8x8 grey images by brightness: mean over
    the pixels, then two logits (dark, light)."""
    import onnx
    from onnx import TensorProto, helper

    from pipeline import files

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])
    y = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 2])
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["mean"]),
        helper.make_node("Flatten", ["mean"], ["flat"]),
        helper.make_node("Gemm", ["flat", "w", "b"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    weights = [helper.make_tensor("w", TensorProto.FLOAT, [1, 2], [-8.0, 8.0]),
               helper.make_tensor("b", TensorProto.FLOAT, [2], [4.0, -4.0])]
    model = helper.make_model(helper.make_graph(nodes, "brightness", [x], [y], weights),
                              opset_imports=[helper.make_opsetid("", 18)])
    folder.mkdir(parents=True)
    onnx.save(model, folder / "model.onnx")
    files.write_json(folder / "model.json", {
        "classes": ["dark", "light"], "input": {"layout": "NCHW"}, "calibration": {"temperature": 2.0},
        "preprocessing": {"image_size": 8, "channels": 1, "resize": "stretch"}})
    files.write_checksums(folder)
    return folder
