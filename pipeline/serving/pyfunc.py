"""The MLflow model each export is logged as: a pyfunc over the export's `model.onnx` that
takes images as users hold them, so `mlflow models serve` needs nothing else.

Input: uint8 (N, H, W, C) pixels, C 1 (grey), 3 (RGB) or 4 (RGBA), any H and W; as JSON,
`{"inputs": [...]}`. Each image goes through `images.array_for_model` with the preprocessing
in the export's model.json (prepare's resize mode and size, alpha on white): what training
saw, so there is no train/serve skew. Param `calibrated` (default false) applies the
temperature evaluate fitted. Output: a row per image with `class`, `probability` and
`probabilities` (every class's, in model.json's 'classes' order).

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

from pipeline.data import images
from pipeline.evaluation import calibration
from pipeline.frameworks import onnx_format
from pipeline.frameworks.interface import float_batches

BATCH_SIZE = 64


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """model.onnx and model.json (the artifacts `onnx` and `card`) behind MLflow's pyfunc API."""

    def load_context(self, context) -> None:  # noqa: ANN001
        self.meta = json.loads(Path(context.artifacts["card"]).read_text())
        self.run = onnx_format.runner(Path(context.artifacts["onnx"]).read_bytes(), os.cpu_count() or 1)

    # no type hints: MLflow would read them as a second, conflicting signature
    def predict(self, context, model_input, params=None):  # noqa: ANN001, ANN201
        pixels = np.asarray(model_input)
        if pixels.ndim == 3:  # one image
            pixels = pixels[None]
        if pixels.ndim != 4:
            raise ValueError(f"expected uint8 images (N, H, W, C), got an array of shape {pixels.shape}")
        prep = self.meta["preprocessing"]
        fitted = np.stack([images.array_for_model(p, prep["image_size"], prep["channels"], prep["resize"])
                           for p in pixels])
        proba = self.run(float_batches(fitted, BATCH_SIZE, self.meta["input"]["layout"])).astype(np.float64)
        if (params or {}).get("calibrated"):
            proba = calibration.scale(proba, float(self.meta["calibration"]["temperature"]))
        classes = self.meta["classes"]
        top = proba.argmax(1)
        return pd.DataFrame({"class": [classes[i] for i in top], "probability": proba[np.arange(len(top)), top],
                             "probabilities": [row.tolist() for row in proba]})


mlflow.models.set_model(ImageClassifier())
