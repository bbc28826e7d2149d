"""A served model under load and fault (`pipeline.serving.loadtest`): `mlflow models serve` of a
logged export, clients at once sending valid images and every kind of input it would misread.
Each valid answer must equal `serving.predict`'s on the same pixels, each invalid one a 400 of
one line with neither the input nor a stack trace, and the server must answer at the end."""

from __future__ import annotations

import json
import os

import mlflow
import numpy as np
import pytest
from support import served_model, tiny_export

from pipeline.serving import loadtest
from pipeline.tracking import models

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("fault-serving")]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(URL, export folder) of `mlflow models serve` on the tiny brightness model, logged as export logs it."""
    tmp = tmp_path_factory.mktemp("served")
    export = tiny_export(tmp / "export")
    store = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(store)
    try:
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("serving", (tmp / "artifacts").as_uri()))
        with mlflow.start_run():
            model_id = models.log_model(mlflow, export, np.zeros((1, 8, 8, 1), np.uint8), tmp / "scratch",
                                        {"model": "tiny"}, {})
    finally:
        mlflow.set_tracking_uri(None)
    with served_model(f"models:/{model_id}", {**os.environ, "MLFLOW_TRACKING_URI": store}) as url:
        yield url, export


@pytest.mark.parametrize(("name", "said"), [
    ("float in [0, 1]", "multiply by 255 and round"),
    ("2 channels", "channels, got 2"),
    ("5 channels", "channels, got 5"),
    ("rank 2", "rank 2"),
    ("empty batch", "rank 1"),
    ("NaN", "NaN or infinity"),
    ("value 300", "values in [300, 300]"),
    ("ragged batch", "Invalid input. setting an array element with a sequence"),  # MLflow's parser refuses it first
])
def test_each_input_it_would_misread_gets_a_400_of_one_line(served, name, said):
    url, _ = served
    inputs = dict(loadtest.INVALID)[name]
    status, answer = loadtest.post(url, inputs, timeout=60)
    assert loadtest.check_refusal(name, status, answer) is None, (status, answer)
    assert said in answer["message"], answer
    assert name == "ragged batch" or answer["message"].startswith("input refused: "), answer


def test_clients_at_once_get_right_answers_and_refusals_and_the_server_survives(served):
    url, export = served
    figures = loadtest.run(url, export, clients=4, seconds=6, over_limit=False)  # the limit: tests/unit/serving
    assert figures["wrong"] == [], figures["wrong"][:5]
    assert figures["valid"] >= 20 and figures["invalid"] >= 5, figures
    print(json.dumps({k: v for k, v in figures.items() if k != "wrong"}))
