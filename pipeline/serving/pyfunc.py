"""The MLflow model each export is logged as: a pyfunc over the export's `model.onnx` that
takes images as users hold them, so `mlflow models serve` needs nothing else.

Input: pixels (N, H, W, C) or one image (H, W, C), C 1 (grey), 3 (RGB) or 4 (RGBA), any H and
W, whole numbers 0..255 (`serving.contract`: anything else is refused, never cast); as JSON,
`{"inputs": [...]}`. Each image goes through `images.array_for_model` with the preprocessing
in the export's model.json (prepare's resize mode and size, alpha on white): what training
saw, so there is no train/serve skew. Param `calibrated` (default false) applies the
temperature evaluate fitted. Output: a row per image with `class`, `probability` and
`probabilities` (every class's, in model.json's 'classes' order).

Refusals are HTTP 400 with one line (`Refused`); a failure of the model itself a 500 with one
line: never a stack trace, never the input echoed back. The signature declares no input
schema on purpose: MLflow would cast JSON's numbers to its dtype first (0.5 to 0) and prefix
its own errors with the whole input; `contract.pixels` checks instead.

MLflow logs it as a model from code: this file is the model's code (nothing is pickled) and
the `pipeline` package is copied beside it, so a served model runs the code it was built with.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

from pipeline.data import images
from pipeline.evaluation import calibration
from pipeline.frameworks import onnx_format
from pipeline.frameworks.interface import float_batches
from pipeline.serving import contract

BATCH_SIZE = 64


class Refused(MlflowException):
    """An answer of one line: HTTP 400 (`INVALID_PARAMETER_VALUE`) or 500 (`INTERNAL_ERROR`).
    MLflow's scoring server rewrites an error's message to start with the whole input
    ("Failed to predict data '[[[...'"); the message set at construction stays."""

    def __init__(self, message: str, error_code: int = INVALID_PARAMETER_VALUE) -> None:
        super().__init__(message, error_code=error_code)

    @property
    def message(self) -> str:
        return self.__dict__["_message"]

    @message.setter
    def message(self, value: str) -> None:
        self.__dict__.setdefault("_message", value)


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """model.onnx and model.json (the artifacts `onnx` and `card`) behind MLflow's pyfunc API."""

    def load_context(self, context) -> None:  # noqa: ANN001
        self.meta = json.loads(Path(context.artifacts["card"]).read_text())
        self.run = onnx_format.runner(Path(context.artifacts["onnx"]).read_bytes(), os.cpu_count() or 1)

    # no type hints: MLflow would read them as a second, conflicting signature
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        try:
            pixels = contract.pixels(model_input)
        except contract.Refused as exc:
            raise Refused(f"input refused: {exc}") from None
        try:
            return self.answer(pixels, params or {})
        except Exception as exc:  # a bug or a broken model: one line, no traceback for the client
            said = f"the model failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            raise Refused(said, INTERNAL_ERROR) from exc

    def answer(self, pixels: np.ndarray, params: dict) -> pd.DataFrame:
        prep = self.meta["preprocessing"]
        fitted = np.stack([images.array_for_model(p, prep["image_size"], prep["channels"], prep["resize"])
                           for p in pixels])
        proba = self.run(float_batches(fitted, BATCH_SIZE, self.meta["input"]["layout"])).astype(np.float64)
        if params.get("calibrated"):
            proba = calibration.scale(proba, float(self.meta["calibration"]["temperature"]))
        classes = self.meta["classes"]
        top = proba.argmax(1)
        return pd.DataFrame({"class": [classes[i] for i in top], "probability": proba[np.arange(len(top)), top],
                             "probabilities": [row.tolist() for row in proba]})


mlflow.models.set_model(ImageClassifier())
