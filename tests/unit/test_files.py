"""Outputs are replaced whole or not at all."""

import pytest

from pipeline import files


def test_write_bytes_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "out" / "model.bin"
    files.write_bytes(target, b"old")
    files.write_bytes(target, b"new")
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.bin"]


def test_a_failed_directory_write_keeps_the_previous_contents(tmp_path):
    target = tmp_path / "prepared"
    with files.atomic_dir(target) as tmp:
        (tmp / "a.npy").write_bytes(b"complete")
    with pytest.raises(RuntimeError), files.atomic_dir(target) as tmp:
        (tmp / "a.npy").write_bytes(b"half")
        raise RuntimeError("stage crashed half-way")
    assert (target / "a.npy").read_bytes() == b"complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_a_directory_write_replaces_stale_files(tmp_path):
    target = tmp_path / "exports"
    with files.atomic_dir(target) as tmp:
        (tmp / "stale.onnx").write_bytes(b"x")
    with files.atomic_dir(target) as tmp:
        (tmp / "model.onnx").write_bytes(b"y")
    assert sorted(p.name for p in target.iterdir()) == ["SHA256SUMS", "model.onnx"]


def test_a_folder_carries_checksums_that_catch_a_flipped_byte(tmp_path):
    import hashlib
    import subprocess

    target = tmp_path / "prepared"
    with files.atomic_dir(target) as tmp:
        (tmp / "train.npy").write_bytes(b"pixels")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.json").write_text("{}")
    assert (target / "SHA256SUMS").read_text() == (
        f"{hashlib.sha256(b'{}').hexdigest()}  sub/b.json\n{hashlib.sha256(b'pixels').hexdigest()}  train.npy\n")
    assert subprocess.run(["sha256sum", "-c", "--quiet", "SHA256SUMS"], cwd=target).returncode == 0  # standard format
    files.verify_folder(target, "prepare")
    (target / "train.npy").write_bytes(b"pixelz")
    with pytest.raises(files.ArtifactError, match=r"prepared/train.npy: its content differs from the sha256 .*"
                                                  r"rebuild it with `dvc repro -f -s prepare`"):
        files.verify_folder(target, "prepare")
    (target / "train.npy").unlink()
    with pytest.raises(files.ArtifactError, match=r"train.npy: listed in .*SHA256SUMS but missing; `dvc checkout"):
        files.verify_folder(target, "prepare")
    (target / "SHA256SUMS").unlink()
    with pytest.raises(files.ArtifactError, match=r"SHA256SUMS: missing, so .*prepared cannot be verified"):
        files.verify_folder(target, "prepare")
    with pytest.raises(files.ArtifactError, match=r"nowhere: not found; rebuild it with `dvc repro -f -s train`"):
        files.verify_folder(tmp_path / "nowhere", "train")


def test_a_full_disk_names_the_file_it_could_not_write(tmp_path, monkeypatch):
    import errno
    import os

    real_fdopen = os.fdopen

    class Full:
        def __init__(self, fd, mode):
            self.f = real_fdopen(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")  # what write() raises: no file name

    monkeypatch.setattr(os, "fdopen", Full)
    with pytest.raises(OSError, match=r"No space left on device: '.*model.bin'") as info:
        files.write_bytes(tmp_path / "model.bin", b"x" * 10)
    assert info.value.errno == errno.ENOSPC and not list(tmp_path.iterdir())  # no temporary left behind


def test_json_is_written_with_sorted_keys_so_equal_objects_give_equal_bytes(tmp_path):
    files.write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    files.write_json(tmp_path / "b.json", {"a": [1, 2], "b": 1})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
