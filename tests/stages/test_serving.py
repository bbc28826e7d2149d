"""Models that ship through MLflow: the pyfunc over the ONNX export (`pipeline.serving.pyfunc`), its
logging (`models.log_model`), the registry and its alias (`models.register`,
the register stage's choice) and `mlflow models serve` on the champion."""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
import skimage.data
from mlflow.exceptions import MlflowException
from PIL import Image
from support import REPO, run, served_model, tiny_export

from pipeline import config, register
from pipeline.config import ConfigError
from pipeline.data import images
from pipeline.errors import ArtifactError
from pipeline.serving import predict, pyfunc
from pipeline.tracking import models


def photo(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def test_an_array_becomes_what_the_same_pixels_in_a_file_become(tmp_path):
    """Serving takes arrays, predict and prepare take files: the same pixels give the same input."""
    for name, pixels in [("grey.png", photo((30, 50))), ("rgb.png", photo((40, 25, 3))),
                         ("rgba.png", photo((20, 20, 4))), ("grey1.png", photo((12, 9, 1)))]:
        path = tmp_path / name
        Image.fromarray(pixels[..., 0] if pixels.shape[-1:] == (1,) else pixels).save(path)
        for channels in (1, 3):
            for resize in ("stretch", "crop", "pad"):
                from_file = images.load_for_model(path, 16, channels, resize)
                assert np.array_equal(images.array_for_model(pixels, 16, channels, resize), from_file), name
    for bad in (np.zeros((4, 4, 2), np.uint8), np.zeros((4, 4), np.float32), np.zeros((2, 4, 4, 3), np.uint8)):
        with pytest.raises(images.Rejected, match=r"expected uint8 pixels of shape \(H, W\)"):
            images.array_for_model(bad, 16, 1)


def experiment(name: str, tmp_path: Path) -> None:
    """An experiment whose artifacts stay under `tmp_path` (the default is ./mlruns)."""
    mlflow.set_experiment(experiment_id=mlflow.create_experiment(name, (tmp_path / "artifacts").as_uri()))


def test_the_logged_model_takes_any_image_and_answers_as_the_export(tmp_path):
    export = tiny_export(tmp_path / "export")
    onnx_bytes, meta = predict.read_export(export)
    experiment("serving", tmp_path)
    with mlflow.start_run(tags={"mlflow.source.name": "pipeline/export.py"}):
        model_id = models.log_model(mlflow, export, photo((1, 8, 8, 1)), tmp_path / "scratch",
                                             {"model": "tiny"}, {"test/acc": 0.5})
    logged = mlflow.get_logged_model(model_id)
    assert {m.key for m in logged.metrics} == {"test/acc"} and logged.tags["model"] == "tiny"
    assert logged.name == "tiny" and logged.tags["mlflow.source.name"] == "pipeline/export.py"  # not the worker
    model = mlflow.pyfunc.load_model(f"models:/{model_id}")
    sig = model.metadata.signature
    assert sig.inputs is None  # serving.contract checks the input: MLflow's schema would cast it first
    assert [c["name"] for c in sig.outputs.to_dict()] == ["class", "probability", "probabilities"]
    assert model.metadata.saved_input_example_info["type"] == "ndarray"

    dark, light = np.full((1, 40, 30, 3), 20, np.uint8), np.full((1, 40, 30, 3), 230, np.uint8)
    answer = model.predict(np.concatenate([dark, light]))
    assert list(answer["class"]) == ["dark", "light"]
    # the same pixels as a file, through predict: the same probabilities (no train/serve skew)
    Image.fromarray(light[0]).save(tmp_path / "light.png")
    (row,) = predict.classify([tmp_path / "light.png"], onnx_bytes, meta, batch_size=4, threads=1)
    assert np.allclose(answer["probabilities"][1], row["probabilities"], atol=1e-7)
    assert answer["probability"][1] == pytest.approx(max(row["probabilities"]))
    calibrated = model.predict(light, params={"calibrated": True})["probability"][0]
    assert 0.5 < calibrated < answer["probability"][1]  # T = 2 softens it
    # what it would misread is refused, in Python as over HTTP (tests/faults/test_fault_serving.py)
    for bad, said in [(np.zeros((1, 4, 4, 2), np.uint8), "channels, got 2"),
                      (light / 255.0, "multiply by 255 and round"), (np.zeros((4, 4)), "rank 2"),
                      (np.zeros((1, 2897, 2897, 1), np.uint8), "over the limit of 8,388,608 a request")]:
        with pytest.raises(MlflowException, match=f"input refused: .*{said}"):  # the model's own copy of Refused
            model.predict(bad)
    assert list(model.predict(light[0].astype(np.float32))["class"]) == ["light"]  # one image, whole numbers


def test_a_refusal_keeps_its_one_line_when_mlflow_prefixes_the_input():
    refused = pyfunc.Refused("input refused: rank 2")
    refused.message = "Failed to predict data '[[0, 0, ...]]'. Error: input refused: rank 2"  # what the server does
    assert refused.message == "input refused: rank 2"
    assert json.loads(refused.serialize_as_json())["message"] == "input refused: rank 2"
    assert refused.get_http_status_code() == 400


def test_the_alias_moves_only_to_a_better_model_on_the_same_data(tmp_path):
    experiment("registry", tmp_path)
    client = mlflow.MlflowClient()
    logged = {}

    def candidate(name: str, score: float, dataset: str = "d1", select_by: str = "val_acc") -> tuple[str, dict]:
        if name not in logged:
            logged[name] = mlflow.create_external_model(name=name).model_id
        return logged[name], {"model": name, "score": score, "select_by": select_by, "higher_is_better": True,
                              "dataset_sha256": dataset, "onnx_sha256": f"sha-{name}"}

    def champion() -> tuple[str, str]:
        version = client.get_model_version_by_alias("clf", "champion")
        return int(version.version), version.tags["model"]

    models.register(mlflow, client, "clf", "champion", *candidate("a", 0.90))
    assert champion() == (1, "a")
    models.register(mlflow, client, "clf", "champion", *candidate("b", 0.85))
    assert champion() == (1, "a")  # registered as version 2, the alias stays
    models.register(mlflow, client, "clf", "champion", *candidate("c", 0.90))
    assert champion() == (1, "a")  # a tie does not move it
    models.register(mlflow, client, "clf", "champion", *candidate("d", 0.95))
    assert champion() == (4, "d")
    models.register(mlflow, client, "clf", "champion", *candidate("a", 0.90))
    assert champion() == (4, "d")  # the same ONNX file again: its old version, no new one
    models.register(mlflow, client, "clf", "champion", *candidate("e", 0.10, dataset="d2"))
    assert champion() == (5, "e")  # a champion chosen on other data says nothing about this data
    models.register(mlflow, client, "clf", "champion", *candidate("f", 0.05, dataset="d2",
                                                                           select_by="val_loss"))
    assert champion() == (6, "f")
    assert len(client.search_model_versions("name = 'clf'")) == 6


def test_register_picks_by_validation_never_by_test():
    curves = {"scratch": {"best": {"val_acc": 0.91, "val_loss": 0.30}},
              "finetune": {"best": {"val_acc": 0.97, "val_loss": 0.35}}}
    models = ["scratch", "finetune"]
    assert register.choose(register.scores(models, curves, "val_acc"), True) == "finetune"
    assert register.choose(register.scores(models, curves, "val_loss"), False) == "scratch"
    assert register.choose({"a": 0.5, "b": 0.5}, True) == "a"  # a tie: the first listed
    with pytest.raises(ArtifactError, match=r"dvclive/finetune/metrics.json: no best/val_acc for finetune"):
        register.scores(models, {**curves, "finetune": {}}, "val_acc")
    with pytest.raises(ConfigError, match=r"register.select_by.*test_acc.*val_acc"):
        config.from_dict({"select_by": "test_acc"}, register.RegisterParams, where="params.yaml: register")
    with pytest.raises(ConfigError, match="model_name"):
        register.RegisterParams(model_name="my model's")
    with pytest.raises(ConfigError, match="reserved"):
        register.RegisterParams(alias="latest")


@pytest.mark.slow
def test_mlflow_serves_the_champion_as_the_export_answers(trained, tmp_path):
    """export and register on the tiny model, then `mlflow models serve` on models:/<name>@champion:
    a real photo (any size, RGB for a grey model) in as JSON, the export's probabilities out."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": store}
    out = tmp_path / "exports"
    run([sys.executable, "-m", "pipeline", "export", "--model", "scratch", "--data", str(trained / "data/prepared"),
         "--models", str(trained / "models"), "--out", str(out / "scratch"), "--live", str(tmp_path / "live"),
         "--evaluation", str(trained / "dvclive/evaluate/scratch")], cwd=trained, env=env)
    run([sys.executable, "-m", "pipeline", "register", "--models", "scratch", "--data", str(trained / "data/prepared"),
         "--exports", str(out), "--curves", str(trained / "dvclive"), "--live", str(tmp_path / "reg")],
        cwd=trained, env=env)
    selection = json.loads((tmp_path / "reg/selection.json").read_text())
    assert selection["model"] == "scratch" and selection["select_by"] == "val_acc"

    with served_model("models:/cnn-pipeline@champion", env) as url:
        astronaut = skimage.data.astronaut()[::2, ::3]  # 256 x 171 RGB, a grey 16 px model
        request = urllib.request.Request(
            f"{url}/invocations", data=json.dumps({"inputs": astronaut[None].tolist()}).encode(),
            headers={"Content-Type": "application/json"},
        )
        answer = json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
    Image.fromarray(astronaut).save(tmp_path / "astronaut.png")
    onnx_bytes, meta = predict.read_export(out / "scratch")
    (row,) = predict.classify([tmp_path / "astronaut.png"], onnx_bytes, meta, batch_size=1, threads=1)
    (served,) = answer
    assert served["class"] == meta["classes"][int(np.argmax(row["probabilities"]))]
    assert np.allclose(served["probabilities"], row["probabilities"], atol=1e-6)

    # a store that never saw the export (a new machine, a deleted mlflow.db): register logs the model itself
    fresh = f"sqlite:///{tmp_path / 'fresh.db'}"
    run([sys.executable, "-m", "pipeline", "register", "--models", "scratch", "--data", str(trained / "data/prepared"),
         "--exports", str(out), "--curves", str(trained / "dvclive"), "--live", str(tmp_path / "reg2")],
        cwd=trained, env={**env, "MLFLOW_TRACKING_URI": fresh})
    client = mlflow.MlflowClient(fresh)
    version = client.get_model_version_by_alias("cnn-pipeline", "champion")
    assert client.get_run(version.run_id).data.tags["stage"] == "register"
