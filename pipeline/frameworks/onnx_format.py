"""ONNX files as both frameworks ship them: the model card as metadata, run by ONNX Runtime,
and their int8 twin (ONNX Runtime static quantisation)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from pipeline.frameworks.interface import Runner

# The ops int8 quantisation covers: the convolutions and dense layers with what follows them
# (ReLU6 is a Clip, residuals an Add, then the pooling), nothing else. ONNX Runtime's default
# list also quantises Mul, Sub and Div, and TF-style "same" padding computes its pad widths
# with exactly those ops on shapes cast to float: quantised, the pads came out wrong and
# EfficientNet-Lite0 agreed with its float model on 62% of the digits.
INT8_OPS = ("Conv", "Gemm", "MatMul", "Clip", "Relu", "Add", "GlobalAveragePool")


def with_metadata(proto: Any, meta: dict) -> bytes:
    """An ONNX ModelProto with `meta` as its metadata properties (JSON values), checked and
    serialised deterministically: either framework's ONNX file carries the same card."""
    import onnx

    del proto.metadata_props[:]
    for key, value in sorted(meta.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value, sort_keys=True)
    onnx.checker.check_model(proto)
    return proto.SerializeToString(deterministic=True)


def runner(onnx_bytes: bytes, threads: int) -> Runner:
    """An ONNX Runtime session on the CPU with pinned threads, as a function from batches of
    float32 input to the concatenated outputs (an empty array for no batches)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # the graph optimiser's notes on unused initialisers are not errors
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]

    def run(images: Iterable[np.ndarray]) -> np.ndarray:
        outputs = [session.run(None, {name: batch})[0] for batch in images]
        return np.concatenate(outputs) if outputs else np.empty((0, 0), np.float32)

    return run


def predict_onnx(onnx_bytes: bytes, images: Iterable[np.ndarray], threads: int) -> np.ndarray:
    """ONNX Runtime's outputs for batches of float32 input, on the CPU with pinned threads."""
    return runner(onnx_bytes, threads)(images)


def quantize_int8(onnx_bytes: bytes, calibration: Sequence[np.ndarray], meta: dict) -> bytes:
    """The int8 twin of a float ONNX model: ONNX Runtime static quantisation in QDQ form, int8
    weights per output channel, int8 activations whose ranges are the min/max seen on the
    `calibration` batches (float32, the model's input). Float in and probabilities out, as the
    float file; the first and last weighted layers stay float (the image and the logits are
    where 256 levels cost most: on EfficientNet-Lite0 they halve the largest probability
    shift), and so do resizing inside the graph and the softmax."""
    import logging

    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    graph = onnx.load_from_string(onnx_bytes).graph

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(calibration)

        def get_next(self) -> dict | None:
            batch = next(self.batches, None)
            return None if batch is None else {graph.input[0].name: batch}

    weighted = [n.name for n in graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    keep_float = [n.name for n in graph.node if n.op_type in ("Softmax", "Resize")] + weighted[:1] + weighted[-1:]
    root = logging.getLogger()
    level = root.level
    with tempfile.TemporaryDirectory() as tmp:
        source, target = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "int8.onnx")
        with open(source, "wb") as f:
            f.write(onnx_bytes)
        root.setLevel(logging.ERROR)  # it advises pre-processing at WARNING on the root logger; measured: no gain here
        try:
            quantize_static(source, target, Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            op_types_to_quantize=list(INT8_OPS), nodes_to_exclude=keep_float,
                            calibrate_method=CalibrationMethod.MinMax)
        finally:
            root.setLevel(level)
        proto = onnx.load(target)
    return with_metadata(proto, {**meta, "quantization": "int8 static (ONNX Runtime, QDQ, per-channel weights)"})
