"""The `torch` framework behind `frameworks.interface.Backend`: the default for every stage.

Training is `recipe.fit`; a model file is `checkpoint.checkpoint_bytes`' checkpoint; the exports
are `export`'s TorchScript, ONNX and int8 ONNX files (`model.torchscript.pt`, `model.onnx`,
`model_int8.onnx`), the model card embedded in each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline import files
from pipeline.frameworks import interface, onnx_format
from pipeline.frameworks.card import ModelCard
from pipeline.frameworks.interface import ExportOptions, RuntimeParams, Shipped, float_batches
from pipeline.frameworks.torch import checkpoint, distributed, export, recipe, runtime


class TorchBackend(interface.Backend):
    framework = "torch"
    model_file = "model.pt"
    layout = "NCHW"
    checkpoint_suffix = ".pt"

    def __init__(self, rt: RuntimeParams, seed: int = 0) -> None:
        self.runtime = rt
        self.device = distributed.device_for(runtime.configure(rt))
        self.world = distributed.join(self.device)  # torchrun's process group, when the stage runs under it
        self.generator = runtime.seed_everything(seed)  # data order and augmentation

    def describe(self) -> dict[str, str]:
        info = {"framework": self.framework, **runtime.describe(self.device, self.runtime)}
        if self.world.size > 1:
            info["processes"] = str(self.world.size)
        return info

    def build(self, arch: str, model_args: dict[str, Any]) -> nn.Module:
        return checkpoint.build(arch, model_args)

    def fit(self, net, train, val, p, run=None, desc="train", checkpoint=None) -> recipe.FitResult:
        return recipe.fit(net, train, val, p, self.device, self.generator, run, desc=desc, checkpoint=checkpoint)

    def serialize(self, net: nn.Module, card: ModelCard) -> bytes:
        return checkpoint.checkpoint_bytes(net.cpu(), card.arch, card.model_args, card.classes)

    def deserialize(self, path: Path, card: ModelCard) -> nn.Module:
        net, _ = checkpoint.load_checkpoint(path)
        return net.to(self.device)

    def predict(self, net: nn.Module, images: np.ndarray, batch_size: int) -> np.ndarray:
        logits = recipe.predict_logits(net.to(self.device), images, self.device, batch_size)  # streamed when large
        return interface.softmax64(logits.numpy())

    def explain(self, net: nn.Module, images: np.ndarray, targets: np.ndarray) -> np.ndarray:
        from pipeline.frameworks.torch import explain

        return explain.grad_cam(net, images, targets)

    def count_parameters(self, net: nn.Module) -> int:
        return sum(p.numel() for p in net.parameters())

    def export(
        self, net: nn.Module, out: Path, example: np.ndarray, calibration: np.ndarray, meta: dict,
        options: ExportOptions,
    ) -> dict[str, Shipped]:
        # traced on the CPU: the files must not depend on the GPU
        shipped = export.WithSoftmax(net.to(torch.device("cpu"))).eval()
        traced_on = torch.from_numpy(next(float_batches(example[:2], 2, "NCHW")))
        with torch.no_grad():
            script = export.to_torchscript(shipped, traced_on, meta)
            onnx_bytes = export.to_onnx(shipped, traced_on, meta, options.opset, options.onnx_exporter)
        int8 = onnx_format.quantize_int8(onnx_bytes, list(float_batches(calibration, 32, "NCHW")), meta)
        written = {"torchscript": ("model.torchscript.pt", script), "onnx": ("model.onnx", onnx_bytes),
                   "onnx_int8": ("model_int8.onnx", int8)}
        for name, blob in written.values():
            files.write_bytes(out / name, blob)
        threads = self.runtime.thread_count
        runners = {"torchscript": export.torchscript_runner(script), "onnx": onnx_format.runner(onnx_bytes, threads),
                   "onnx_int8": onnx_format.runner(int8, threads)}
        return {name: Shipped(file, runners[name]) for name, (file, _) in written.items()}
