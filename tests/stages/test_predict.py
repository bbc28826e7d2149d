"""`python -m pipeline.serving.predict`: a user's image files in, one row each out, through the ONNX
export and prepare's own preprocessing, without torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from support import REPO, run

from pipeline.data import formats
from pipeline.serving import predict

# an export of the tiny model first, by the one worker that runs this module's tests
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("predict")]


@pytest.fixture(scope="session")  # a module fixture is rebuilt each time a worker comes back to the module
def exported(trained, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "scratch"
    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "MLFLOW_TRACKING_URI": f"sqlite:///{out.parent}/m.db"}
    run([sys.executable, "-m", "pipeline", "export", "--model", "scratch", "--data", str(trained / "data/prepared"),
         "--models", str(trained / "models"), "--out", str(out), "--live", str(out.parent / "live"),
         "--evaluation", str(trained / "dvclive/evaluate/scratch")], cwd=trained, env=env)
    return out


@pytest.fixture
def photos(trained, tmp_path):
    """Eight test images as PNG files in nested folders, plus a broken file, a truncated JPEG,
    a text file and a hidden file."""
    test = formats.load_split(trained / "data/prepared", "test")
    folder = tmp_path / "photos"
    for i in range(8):
        path = folder / f"set{i % 2}" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(test.images[i][..., 0]).save(path)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    Image.fromarray(test.images[0][..., 0]).resize((64, 64)).save(folder / "whole.jpg")
    (folder / "truncated.jpg").write_bytes((folder / "whole.jpg").read_bytes()[:200])
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"")
    return folder, test


def test_predictions_match_the_export_on_the_same_pixels(exported, photos, capsys):
    folder, test = photos
    assert predict.main([str(folder), "--model", str(exported), "--format", "json", "--top", "3"]) == 0
    rows = {r["path"]: r for r in json.loads(capsys.readouterr().out)}
    names = sorted(Path(p).relative_to(folder).as_posix() for p in rows)
    assert names == ["broken.png", "set0/0.png", "set0/2.png", "set0/4.png", "set0/6.png", "set1/1.png",
                     "set1/3.png", "set1/5.png", "set1/7.png", "truncated.jpg", "whole.jpg"]
    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    x = np.asarray(test.images[:8], np.float32).transpose(0, 3, 1, 2) / 255
    expected = session.run(None, {"image": x})[0]
    classes = json.loads((exported / "model.json").read_text())["classes"]
    for i in range(8):
        row = rows[str(folder / f"set{i % 2}" / f"{i}.png")]
        assert row["class"] == classes[int(expected[i].argmax())]
        assert row["probability"] == pytest.approx(float(expected[i].max()), abs=1e-6)
        assert [t["probability"] for t in row["top"]] == sorted((t["probability"] for t in row["top"]), reverse=True)
        assert len(row["top"]) == 3 and row["error"] is None
    assert "cannot decode" in rows[str(folder / "broken.png")]["error"]
    assert rows[str(folder / "truncated.jpg")]["error"] and rows[str(folder / "whole.jpg")]["class"]


def test_csv_rows_errors_and_exit_codes(exported, photos, tmp_path, capsys):
    folder, _ = photos
    out = tmp_path / "rows.csv"
    assert predict.main([str(folder / "set0"), str(folder / "broken.png"), "--model", str(exported), "--out",
                         str(out)]) == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "path,class,probability,top,error" and len(lines) == 1 + 5
    assert lines[-1].startswith(f"{folder / 'broken.png'},,,,cannot decode")
    assert "1 of 5 files could not be classified" in capsys.readouterr().err
    assert predict.main([str(folder / "broken.png"), str(folder / "notes.txt"), "--model", str(exported)]) == 1
    assert predict.main([str(folder / "missing.png"), "--model", str(exported)]) == 1
    assert "missing.png: no such file or folder" in capsys.readouterr().err


def test_calibration_changes_confidence_never_the_class(exported, photos, capsys):
    folder, _ = photos
    predict.main([str(folder / "set0"), "--model", str(exported), "--format", "json"])
    plain = json.loads(capsys.readouterr().out)
    predict.main([str(folder / "set0"), "--model", str(exported), "--format", "json", "--calibrated"])
    scaled = json.loads(capsys.readouterr().out)
    assert [r["class"] for r in plain] == [r["class"] for r in scaled]
    assert [r["probability"] for r in plain] != [r["probability"] for r in scaled]


def test_a_tampered_export_is_refused_and_no_framework_is_imported(exported, photos, tmp_path):
    folder, _ = photos
    script = (f"import sys; from pipeline.serving import predict; "
              f"code = predict.main([{str(folder / 'set1')!r}, '--model', {str(exported)!r}]); "
              "assert 'torch' not in sys.modules and 'tensorflow' not in sys.modules; sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env={"PYTHONPATH": str(REPO)},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for f in exported.iterdir():
        (tampered / f.name).write_bytes(f.read_bytes())
    data = bytearray((tampered / "model.onnx").read_bytes())
    data[-1] ^= 1
    (tampered / "model.onnx").write_bytes(bytes(data))
    done = subprocess.run([sys.executable, "-m", "pipeline.serving.predict", str(folder), "--model", str(tampered)],
                          cwd=tmp_path, env={"PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "model.onnx: its content differs from the sha256" in done.stderr
