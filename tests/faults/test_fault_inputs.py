"""Bad inputs a stage reads: weights that hold code or were swapped, a prepared split with a
flipped byte, a full disk (while writing a checkpoint, an export, a metrics file); and the
switch that shows the traceback behind a short message."""

from __future__ import annotations

import errno
import os
import pickle
import shutil

import pytest
import torch
from helpers import assert_expected_failure, stage, stage_env
from support import TINY_PARAMS

from pipeline import __main__ as entry
from pipeline.frameworks.torch import weights
from pipeline.frameworks.torch.model import WeightsError
from pipeline.tracking import store

# stages in subprocesses (make test runs them, test-fast does not), on one worker: one `trained_briefly` below
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("fault-inputs")]


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_weights_that_hold_code_are_refused_without_torch_advice_to_unpickle(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "backbone.pt"
    path.write_bytes(pickle.dumps({"w": RunsCode()}))
    with pytest.raises(WeightsError) as info:
        weights.read_state_dict(path)
    message = str(info.value)
    assert str(path) in message and "never unpickles code" in message
    assert "weights_only=False" not in message and "will likely succeed" not in message
    assert not (tmp_path / "pwned.txt").exists()


def test_a_pickle_named_safetensors_names_the_file(tmp_path):
    path = tmp_path / "backbone.safetensors"
    path.write_bytes(pickle.dumps({"w": RunsCode()}))
    with pytest.raises(WeightsError, match=r"backbone.safetensors: not a valid safetensors file \(.*header"):
        weights.read_state_dict(path)


def test_swapped_weights_are_refused_by_their_pinned_hash(tmp_path):
    path = tmp_path / "backbone.pt"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(WeightsError, match=r"backbone.pt: sha256 is [0-9a-f]{64}, but finetune.weights_sha256 pins "
                                           r"0{64}; refusing these weights"):
        weights.load_pretrained("timm:tf_efficientnet_lite0", str(path), "0" * 64)


def test_a_flipped_byte_in_a_prepared_split_stops_training_naming_the_file(prepared, tmp_path):
    (tmp_path / "params.yaml").write_text(TINY_PARAMS)
    data = tmp_path / "data/prepared"
    shutil.copytree(prepared, data)
    split = bytearray((data / "train_images.npy").read_bytes())
    split[-1] ^= 1  # one pixel's lowest bit: the model would train on it without a word
    (data / "train_images.npy").write_bytes(bytes(split))
    done = stage(tmp_path, "train")
    assert_expected_failure(done, "data/prepared/train_images.npy: its content differs from the sha256",
                            "rebuild it with `dvc repro -f -s prepare`")
    assert not (tmp_path / "models").exists()


def test_a_full_disk_is_one_line_naming_the_file(monkeypatch, capsys):
    class Stage:
        @staticmethod
        def main(argv):
            raise OSError(errno.ENOSPC, "No space left on device", "models/scratch/model.pt")

    monkeypatch.setattr(entry.importlib, "import_module", lambda name: Stage)
    monkeypatch.setattr(store, "start_worker", lambda: None)
    monkeypatch.delenv(entry.DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as info:
        entry.main(["train"])
    err = capsys.readouterr().err
    assert info.value.code == 1
    assert err.startswith("error: models/scratch/model.pt: no space left on the device while writing it")
    assert "`dvc checkout train` restores" in err and "Traceback" not in err


def test_pipeline_debug_shows_the_traceback_behind_the_message(tmp_path):
    (tmp_path / "params.yaml").write_text(TINY_PARAMS.replace("lr: 3.0e-3", "lr: -1.0"))
    done = stage(tmp_path, "train", env=stage_env(PIPELINE_DEBUG="1"))
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "ConfigError: params.yaml: train.lr: must be in (0, 10]" in done.stderr


@pytest.fixture
def small_disk(tmp_path):
    """A 256 KB tmpfs (root only): a real full disk, not a simulated one."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_really_full_disk_while_writing_a_checkpoint_keeps_the_previous_model(prepared, tmp_path, small_disk):
    (tmp_path / "params.yaml").write_text(TINY_PARAMS.replace("epochs: 2,", "epochs: 1,"))
    previous = small_disk / "scratch"
    previous.mkdir()
    (previous / "model.pt").write_bytes(b"the previous model")
    done = stage(tmp_path, "train", "--data", str(prepared), "--out", str(previous), "--live", str(tmp_path / "live"))
    assert_expected_failure(done, f"error: {previous}/model.pt: no space left on the device while writing it")
    assert (previous / "model.pt").read_bytes() == b"the previous model"
    assert sorted(p.name for p in small_disk.iterdir()) == ["scratch"]  # no temporary folder left
    assert not (tmp_path / "live").exists()  # the metrics were not moved into place either


def fill(disk, leave: int) -> None:
    """Leave `leave` bytes free on `disk`."""
    free = shutil.disk_usage(disk).free
    (disk / "filler").write_bytes(b"\0" * max(free - leave, 0))


@pytest.fixture(scope="session")  # a module fixture is rebuilt each time a worker comes back to the module
def trained_briefly(prepared, tmp_path_factory):
    work = tmp_path_factory.mktemp("trained")
    (work / "params.yaml").write_text(TINY_PARAMS.replace("epochs: 2,", "epochs: 1,"))
    for args in (["train"], ["evaluate", "--model", "scratch", "--live", str(work / "live-evaluate")]):
        done = stage(work, *args, "--data", str(prepared))
        assert done.returncode == 0, done.stderr[-3000:]
    return work


def test_a_really_full_disk_while_writing_an_export_keeps_the_previous_one(prepared, trained_briefly, small_disk):
    previous = small_disk / "scratch"
    previous.mkdir()
    (previous / "model.onnx").write_bytes(b"the previous export")
    fill(small_disk, 16 * 1024)  # less than the tiny model's ONNX file
    work = trained_briefly
    done = stage(work, "export", "--model", "scratch", "--data", str(prepared), "--out", str(previous),
                 "--live", str(work / "live-export"), "--evaluation", str(work / "live-evaluate"))
    assert_expected_failure(done, f"error: {previous}/", "no space left on the device while writing it")
    assert (previous / "model.onnx").read_bytes() == b"the previous export"
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "scratch"]  # no temporary folder left
    assert not (trained_briefly / "live-export").exists()


def test_a_really_full_disk_while_writing_metrics_keeps_the_previous_ones(prepared, trained_briefly, small_disk):
    live = small_disk / "evaluate"
    live.mkdir()
    (live / "metrics.json").write_text('{"test_acc": 0.5}\n')
    fill(small_disk, 2 * 1024)  # less than the confusion-matrix plot
    done = stage(trained_briefly, "evaluate", "--model", "scratch", "--data", str(prepared), "--live", str(live))
    assert_expected_failure(done, "no space left on the device while writing it", str(small_disk))
    assert (live / "metrics.json").read_text() == '{"test_acc": 0.5}\n'
    assert sorted(p.name for p in small_disk.iterdir()) == ["evaluate", "filler"]
