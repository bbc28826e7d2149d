"""The `torch` framework behind `backends.Backend`: the default for every stage.

Training is `engine.fit`; a model file is `models.save_checkpoint`'s checkpoint; the exports
are TorchScript and ONNX (`model.torchscript.pt`, `model.onnx`), both taking float32
(N, C, H, W) images in [0, 1] and returning probabilities, the model card embedded in each.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pipeline import backends, engine, files, models, runtime

if TYPE_CHECKING:
    from pipeline.export import ExportParams

INPUT_NAME, OUTPUT_NAME = backends.INPUT_NAME, backends.OUTPUT_NAME


class Backend(backends.Backend):
    framework = "torch"
    model_file = "model.pt"
    layout = "NCHW"

    def __init__(self, rt: runtime.RuntimeParams, seed: int = 0) -> None:
        self.runtime = rt
        self.device = runtime.configure(rt)
        self.generator = runtime.seed_everything(seed)  # data order and augmentation

    def describe(self) -> dict[str, str]:
        return {"framework": self.framework, **runtime.describe(self.device, self.runtime)}

    def build(self, arch: str, model_args: dict[str, Any]) -> nn.Module:
        return models.build(arch, model_args)

    def fit(self, model, train, val, p, run=None, desc="train") -> engine.FitResult:
        return engine.fit(model, train, val, p, self.device, self.generator, run, desc=desc)

    def serialize(self, model: nn.Module, card: backends.ModelCard) -> bytes:
        return models.checkpoint_bytes(model.cpu(), card.arch, card.model_args, card.classes)

    def deserialize(self, path: Path, card: backends.ModelCard) -> nn.Module:
        model, _ = models.load_checkpoint(path)
        return model.to(self.device)

    def predict_proba(self, model: nn.Module, images: np.ndarray, batch_size: int) -> np.ndarray:
        logits = engine.predict_logits(model.to(self.device), images, self.device, batch_size)  # streamed when large
        return backends.softmax64(logits.numpy())

    def export(self, model: nn.Module, out: Path, test: np.ndarray, calibration: np.ndarray, meta: dict, p: ExportParams) -> dict[str, np.ndarray]:
        # traced on the CPU: the files must not depend on the GPU
        cpu = torch.device("cpu")
        shipped = WithSoftmax(model.to(cpu)).eval()
        example = torch.from_numpy(next(backends.float_batches(test[:2], 2, "NCHW")))
        with torch.no_grad():
            script = to_torchscript(shipped, example, meta)
            onnx_bytes = to_onnx(shipped, example, meta, p.opset, p.onnx_exporter)
            scripted = load_torchscript(script)
            script_out = np.concatenate([scripted(torch.from_numpy(x)).numpy() for x in backends.float_batches(test, p.batch_size, "NCHW")])
        files.write_bytes(out / "model.torchscript.pt", script)
        files.write_bytes(out / "model.onnx", onnx_bytes)
        onnx_out = backends.onnx_probabilities(onnx_bytes, backends.float_batches(test, p.batch_size, "NCHW"), self.runtime.threads)
        return {"torchscript": script_out, "onnx": onnx_out}


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
            dynamic_shapes={"image": {0: torch.export.Dim("batch")}}, dynamo=True, verbose=False,
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
    return backends.onnx_with_metadata(proto, meta)
