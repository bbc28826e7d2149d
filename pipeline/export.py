"""Export one trained model to TorchScript and ONNX, and check ONNX Runtime against PyTorch.

Reads `models/<model>.pt` and the prepared test split; writes `exports/<model>/`:
`model.torchscript.pt`, `model.onnx` and `model.json` (classes, input format, preprocessing),
and `dvclive/export/<model>/metrics.json` with the parity figures: the largest absolute
difference in output probabilities and the share of test images whose top-1 class agrees.
Both exports take float32 (N, C, H, W) images in [0, 1] at the prepared size and return class
probabilities; normalisation and resizing are inside the graph, and the class names and
preprocessing are embedded in each file as well as in model.json.
"""

from __future__ import annotations

from pipeline import tracking

if __name__ == "__main__":
    # MLflow's start-up (~4 s) runs in a worker process while this one imports torch & co.
    tracking.start_worker()

import argparse
import hashlib
import io
import json
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from pipeline import config, data, engine, files, models, runtime
from pipeline.config import check
from pipeline.evaluate import check_classes

INPUT_NAME, OUTPUT_NAME = "image", "probabilities"


@dataclass(frozen=True)
class ExportParams:
    opset: int = 18
    # 'torchscript' is torch.onnx's tracing exporter, 'dynamo' the torch.export-based one. Both
    # pass the parity check; on EfficientNet-Lite0 here dynamo takes 20 s against 1 s.
    onnx_exporter: Literal["torchscript", "dynamo"] = "torchscript"
    batch_size: int = 256
    max_abs_diff: float = 1.0e-4  # the stage fails if ONNX Runtime drifts further than this
    min_top1_agreement: float = 0.999

    def __post_init__(self) -> None:
        check(17 <= self.opset <= 23, "opset", f"must be in 17..23, got {self.opset}")
        check(self.batch_size >= 1, "batch_size", f"must be at least 1, got {self.batch_size}")
        check(self.max_abs_diff > 0, "max_abs_diff", f"must be > 0, got {self.max_abs_diff}")
        check(0 <= self.min_top1_agreement <= 1, "min_top1_agreement", f"must be in [0, 1], got {self.min_top1_agreement}")


class WithSoftmax(nn.Module):
    """What ships: probabilities, so a server needs nothing but the graph."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.model(image), dim=1)


def metadata(ckpt: dict, split: data.Split, preprocessing: dict) -> dict:
    """Everything a consumer needs to feed the model and read its output.

    `preprocessing` is prepare's record of how a file became a training array (resize mode,
    alpha background...); `pipeline.images.load_for_model` repeats it for a new file."""
    return {
        "classes": list(ckpt["classes"]),
        "arch": ckpt["arch"],
        "input": {
            "name": INPUT_NAME,
            "dtype": "float32",
            "layout": "NCHW",
            "shape": ["batch", split.channels, split.image_size, split.image_size],
            "range": [0.0, 1.0],
            "color_mode": "L" if split.channels == 1 else "RGB",
        },
        "preprocessing": {
            **preprocessing,
            "steps": (
                f"decode (EXIF orientation applied, 16-bit scaled, alpha on {preprocessing.get('alpha_background')}), "
                f"convert to {'L' if split.channels == 1 else 'RGB'}, {preprocessing.get('resize')} to "
                f"{split.image_size}x{split.image_size} (bilinear), divide by 255; normalisation is inside the model"
            ),
        },
        "output": {"name": OUTPUT_NAME, "meaning": "class probabilities, softmax over classes in 'classes' order"},
    }


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
    del proto.metadata_props[:]
    for key, value in sorted(meta.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value, sort_keys=True)
    onnx.checker.check_model(proto)
    return proto.SerializeToString(deterministic=True)


def onnx_probabilities(onnx_bytes: bytes, images: engine.Images, batch_size: int, threads: int) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    out = [session.run([OUTPUT_NAME], {INPUT_NAME: images.take(idx).numpy()})[0]
           for idx in engine.batches(len(images), batch_size, None)]
    return np.concatenate(out)


def parity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    return {
        "max_abs_diff": float(np.abs(reference - candidate).max()),
        "top1_agreement": float((reference.argmax(1) == candidate.argmax(1)).mean()),
    }


def check_parity(name: str, result: dict[str, float], p: ExportParams, model_path: Path) -> None:
    """Refuse to ship an export that does not reproduce the PyTorch model."""
    if result["max_abs_diff"] > p.max_abs_diff or result["top1_agreement"] < p.min_top1_agreement:
        raise RuntimeError(
            f"{name} export of {model_path} disagrees with PyTorch on the test split: {result}; "
            f"allowed: max_abs_diff {p.max_abs_diff}, min_top1_agreement {p.min_top1_agreement} (params.yaml: export)"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="model name: scratch or finetune")
    parser.add_argument("--data", type=Path, default=Path("data/prepared"))
    parser.add_argument("--models", type=Path, default=Path("models"))
    parser.add_argument("--out", type=Path, default=None, help="default: exports/<model>")
    parser.add_argument("--live", type=Path, default=None, help="default: dvclive/export/<model>")
    args = parser.parse_args(argv)
    p = config.load("export", ExportParams)
    rt = config.load("runtime", runtime.RuntimeParams)
    runtime.configure(rt)  # export traces on the CPU: the files must not depend on the GPU
    out = args.out or Path("exports") / args.model
    live_dir = args.live or Path("dvclive/export") / args.model
    model_path = args.models / f"{args.model}.pt"
    test = data.load_split(args.data, "test")
    model, ckpt = models.load_checkpoint(model_path)
    check_classes(tuple(ckpt["classes"]), test.classes, model_path, args.data)
    shipped = WithSoftmax(model).eval()
    cpu = torch.device("cpu")
    inputs = engine.Images(test.images, cpu, channels_last=False)  # float32 (N, C, H, W) in [0, 1]; streamed when large
    dataset = data.read_json(args.data / "dataset.json", "the dataset description")
    meta = metadata(ckpt, test, dataset.get("preprocessing", {}))
    with tracking.stage_run(f"export@{args.model}", {"export": p, "runtime": rt, "model": args.model}, live_dir) as run:
        run.set_tags({"model": args.model, **data.dataset_tags(args.data)})
        with torch.no_grad():
            # predict_logits batches any model; for the shipped ones the outputs are probabilities
            reference = engine.predict_logits(shipped, inputs, cpu, p.batch_size, channels_last=False).numpy()
            example = inputs.take(torch.arange(min(2, len(inputs))))
            script = to_torchscript(shipped, example, meta)
            onnx_bytes = to_onnx(shipped, example, meta, p.opset, p.onnx_exporter)
            scripted = load_torchscript(script)
            script_out = engine.predict_logits(scripted, inputs, cpu, p.batch_size, channels_last=False).numpy()
        onnx_out = onnx_probabilities(onnx_bytes, inputs, p.batch_size, rt.threads)
        onnx_parity, script_parity = parity(reference, onnx_out), parity(reference, script_out)
        run.log_summary({f"onnx/{k}": v for k, v in onnx_parity.items()} | {f"torchscript/{k}": v for k, v in script_parity.items()})
        check_parity("ONNX Runtime", onnx_parity, p, model_path)
        check_parity("TorchScript", script_parity, p, model_path)
        with files.atomic_dir(out) as tmp:
            (tmp / "model.torchscript.pt").write_bytes(script)
            (tmp / "model.onnx").write_bytes(onnx_bytes)
            files.write_json(tmp / "model.json", meta)
        run.log_artifact(out, "export")


if __name__ == "__main__":
    main()
