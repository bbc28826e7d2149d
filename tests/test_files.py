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
    assert sorted(p.name for p in target.iterdir()) == ["model.onnx"]


def test_json_is_written_with_sorted_keys_so_equal_objects_give_equal_bytes(tmp_path):
    files.write_json(tmp_path / "a.json", {"b": 1, "a": [1, 2]})
    files.write_json(tmp_path / "b.json", {"a": [1, 2], "b": 1})
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
