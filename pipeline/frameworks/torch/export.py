"""torch models as shipped files: TorchScript, ONNX and int8 ONNX, all taking float32 (N, C, H, W) images
in [0, 1] and returning probabilities, byte-identical on every rerun."""

from __future__ import annotations

import hashlib
import io
import json
import warnings
import zipfile
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from pipeline.frameworks import onnx_format
from pipeline.frameworks.interface import INPUT_NAME, OUTPUT_NAME, Runner


class WithSoftmax(nn.Module):
    """What ships: probabilities, so a server needs nothing but the graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(image), dim=1)


def to_torchscript(model: nn.Module, example: torch.Tensor, meta: dict) -> bytes:
    with warnings.catch_warnings():
        # torch marks TorchScript deprecated in favour of torch.export, but TorchScript is still
        # what C++ (libtorch) and many serving stacks load; ONNX is shipped beside it.
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, example)
        buffer = io.BytesIO()  # in memory: a named file would put its name in the archive
        torch.jit.save(traced, buffer, _extra_files={"model.json": json.dumps(meta, sort_keys=True)})
    return strip_debug_info(buffer.getvalue())


def strip_debug_info(archive: bytes) -> bytes:
    """Drop TorchScript's *.debug_pkl records (source text and absolute paths of every traced
    module, so the bytes would change with the checkout's folder and the venv's) and derive the
    archive's serialization id from what is left. Loading and outputs are unaffected."""
    source = zipfile.ZipFile(io.BytesIO(archive))
    kept = [info for info in source.infolist() if not info.filename.endswith(".debug_pkl")]
    digest = hashlib.sha256()
    for info in kept:
        if not info.filename.endswith("/.data/serialization_id"):
            digest.update(info.filename.encode() + b"\0" + source.read(info.filename))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in kept:
            body = source.read(info.filename)
            if info.filename.endswith("/.data/serialization_id"):
                body = str(int(digest.hexdigest()[:32], 16)).encode()
            target.writestr(zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)), body)
    return out.getvalue()


def load_torchscript(blob: bytes) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(io.BytesIO(blob))


def to_onnx(model: nn.Module, example: torch.Tensor, meta: dict, opset: int, exporter: str) -> bytes:
    """ONNX with a dynamic batch axis and `meta` as JSON metadata properties."""
    import onnx

    if exporter == "dynamo":
        program = torch.onnx.export(
            model, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], opset_version=opset,
            dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}}, dynamo=True, verbose=False,
        )
        proto = program.model_proto
    else:
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning, UserWarning))
            torch.onnx.export(
                model, (example,), buffer, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                opset_version=opset, dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, dynamo=False,
            )
        proto = onnx.load_from_string(buffer.getvalue())
    return onnx_format.with_metadata(proto, meta)


def torchscript_runner(blob: bytes) -> Runner:
    """The TorchScript file, loaded as a server loads it, as a function from batches of float32
    NCHW input to probabilities."""
    scripted = load_torchscript(blob)

    def run(images: Iterable[np.ndarray]) -> np.ndarray:
        with torch.no_grad():
            return np.concatenate([scripted(torch.from_numpy(x)).numpy() for x in images])

    return run
