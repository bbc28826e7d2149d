"""The framework boundary: everything the stages ask of PyTorch or Keras, behind one interface.

A trained model is a folder, `models/<name>/`, whichever framework trained it:

    model.json    framework, arch, model_args, classes: what rebuilds and reads the model
    model.pt      torch: the checkpoint (`models.save_checkpoint`'s plain containers)
    model.keras   keras: the Keras archive, without the timestamps a plain save writes

The stages hold no framework code of their own beyond what builds a network: `train` picks a
backend by `train.framework`; `evaluate` and `export` open any model folder with `load` and
call the same four methods on it. A backend module is imported only when its framework is
used, so a torch run never imports TensorFlow (about 8 s here, with its configuration) and a keras run never builds
a torch optimizer (importing torch._dynamo after TensorFlow crashes the process).
"""

from __future__ import annotations

import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from pipeline import data, files
from pipeline.config import ConfigError

if TYPE_CHECKING:
    from pipeline.engine import FitParams, FitResult
    from pipeline.export import ExportParams
    from pipeline.runtime import RuntimeParams
    from pipeline.tracking import StageRun

# framework -> the module defining its Backend subclass as `Backend`
MODULES = {"torch": "pipeline.torch_backend", "keras": "pipeline.keras_backend"}
CARD = "model.json"
INPUT_NAME, OUTPUT_NAME = "image", "probabilities"  # every exported format's input and output


@dataclass(frozen=True)
class ModelCard:
    """model.json: what a model folder holds, readable without any framework installed."""

    framework: str
    arch: str
    model_args: dict[str, Any]
    classes: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        args = {k: list(v) if isinstance(v, tuple) else v for k, v in self.model_args.items()}
        return {"framework": self.framework, "arch": self.arch, "model_args": args, "classes": list(self.classes)}


class Backend(ABC):
    """One framework's half of the pipeline. Constructing a backend configures the framework
    for deterministic work (seeds, threads, deterministic kernels, the device)."""

    framework: ClassVar[str]
    model_file: ClassVar[str]  # the weights' file name inside the model folder
    layout: ClassVar[str]  # the exports' input layout: "NCHW" or "NHWC"

    @abstractmethod
    def __init__(self, runtime: RuntimeParams, seed: int) -> None: ...

    @abstractmethod
    def describe(self) -> dict[str, str]:
        """What the run ran on (versions, device, threads), for MLflow tags only."""

    @abstractmethod
    def build(self, arch: str, model_args: dict[str, Any]) -> Any:
        """A fresh, randomly initialised network (seeded by the constructor)."""

    @abstractmethod
    def fit(self, model: Any, train: data.Split, val: data.Split, p: FitParams, run: StageRun | None, desc: str) -> FitResult:
        """The recipe in `p`; early-stops on the unsmoothed val loss and restores the best weights."""

    @abstractmethod
    def serialize(self, model: Any, card: ModelCard) -> bytes:
        """The model file's bytes: equal for equal weights, whenever and wherever saved."""

    @abstractmethod
    def deserialize(self, path: Path, card: ModelCard) -> Any:
        """The model from its file, in inference mode; never runs code stored in the file."""

    @abstractmethod
    def predict_proba(self, model: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
        """Float64 class probabilities (N, classes) for a split's uint8 (N, H, W, C) images,
        read in batches (the array may be a memory map larger than memory)."""

    @abstractmethod
    def export(self, model: Any, out: Path, test: np.ndarray, calibration: np.ndarray, meta: dict, p: ExportParams) -> dict[str, np.ndarray]:
        """Write the shipped files into `out` (a fresh folder) and return each format's
        probabilities on `test` (uint8 NHWC) as its own runtime computes them, for the parity
        check. `calibration` (uint8 NHWC training images) calibrates quantisation; formats
        named '*int8' are quantised and checked against export's int8 thresholds."""


def backend_class(framework: str) -> type[Backend]:
    if framework not in MODULES:
        raise ConfigError(f"framework {framework!r} is not known; valid: {sorted(MODULES)}")
    return importlib.import_module(MODULES[framework]).Backend


def get(framework: str, runtime: RuntimeParams, seed: int = 0) -> Backend:
    """The framework's backend, configured: this is where its module is first imported."""
    return backend_class(framework)(runtime, seed)


def save(out: Path, backend: Backend, model: Any, arch: str, model_args: dict[str, Any], classes: tuple[str, ...]) -> ModelCard:
    """Write the model folder whole or not at all (a failed save leaves the old one)."""
    card = ModelCard(backend.framework, arch, dict(model_args), tuple(classes))
    blob = backend.serialize(model, card)
    with files.atomic_dir(out) as tmp:
        files.write_json(tmp / CARD, card.to_json())
        files.write_bytes(tmp / backend.model_file, blob)
    return card


def read_card(model_dir: Path) -> ModelCard:
    path = Path(model_dir) / CARD
    if not path.is_file():
        hint = f"; {model_dir}.pt is the old single-file layout" if Path(f"{model_dir}.pt").is_file() else ""
        raise FileNotFoundError(f"{path}: not found; {model_dir} is not a trained model folder: run the stage that trains it (dvc repro){hint}")
    raw = data.read_json(path, "the model card")
    missing = {"framework", "arch", "model_args", "classes"} - set(raw)
    if missing:
        raise ValueError(f"{path}: not a model card (missing {sorted(missing)})")
    if raw["framework"] not in MODULES:
        raise ValueError(f"{path}: framework {raw['framework']!r} is not known; valid: {sorted(MODULES)}")
    return ModelCard(raw["framework"], raw["arch"], raw["model_args"], tuple(raw["classes"]))


def load(model_dir: Path, card: ModelCard, runtime: RuntimeParams) -> tuple[Backend, Any]:
    """(backend, model) for a model folder whose card the caller has read (and checked: the
    classes, before any framework loads), with only that model's framework imported."""
    backend = get(card.framework, runtime)
    path = Path(model_dir) / backend.model_file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found, but {Path(model_dir) / CARD} says the model is {card.framework}'s; rerun its stage")
    return backend, backend.deserialize(path, card)


def softmax64(logits: np.ndarray) -> np.ndarray:
    """Probabilities in float64 whose rows sum to 1, from float32 logits (the same maths for both frameworks)."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def onnx_with_metadata(proto: Any, meta: dict) -> bytes:
    """An ONNX ModelProto with `meta` as its metadata properties (JSON values), checked and
    serialised deterministically: either framework's ONNX file carries the same card."""
    import onnx

    del proto.metadata_props[:]
    for key, value in sorted(meta.items()):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value, sort_keys=True)
    onnx.checker.check_model(proto)
    return proto.SerializeToString(deterministic=True)


def onnx_probabilities(onnx_bytes: bytes, images: Iterable[np.ndarray], threads: int) -> np.ndarray:
    """ONNX Runtime's outputs for batches of float32 input, on the CPU with pinned threads."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    return np.concatenate([session.run(None, {name: batch})[0] for batch in images])


def float_batches(images: np.ndarray, batch_size: int, layout: str = "NHWC") -> Iterator[np.ndarray]:
    """Float32 [0, 1] batches of a uint8 (N, H, W, C) array, read a batch at a time."""
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start : start + batch_size], np.float32) / 255
        yield np.ascontiguousarray(batch.transpose(0, 3, 1, 2)) if layout == "NCHW" else batch
