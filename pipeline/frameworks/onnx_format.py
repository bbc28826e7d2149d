"""ONNX files as both frameworks ship them: the model card as metadata, run by ONNX Runtime."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import numpy as np


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


def predict_onnx(onnx_bytes: bytes, images: Iterable[np.ndarray], threads: int) -> np.ndarray:
    """ONNX Runtime's outputs for batches of float32 input, on the CPU with pinned threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    outputs = [session.run(None, {name: batch})[0] for batch in images]
    return np.concatenate(outputs) if outputs else np.empty((0, 0), np.float32)
