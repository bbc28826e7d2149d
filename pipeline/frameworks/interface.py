"""The interface every framework implements (`Backend`), and what it is handed.

Nothing here imports a framework: stages and the model-folder code use these names whichever
framework is installed or chosen.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from pipeline.config import check
from pipeline.runtime import cpu_share

if TYPE_CHECKING:
    from pipeline.data.formats import Split
    from pipeline.frameworks.card import ModelCard
    from pipeline.frameworks.recipe import FitParams, FitResult
    from pipeline.tracking.run import StageRun

INPUT_NAME, OUTPUT_NAME = "image", "probabilities"  # every exported format's input and output


@dataclass(frozen=True)
class RuntimeParams:
    """params.yaml `runtime`: where and how a framework computes."""

    # intra-op CPU threads; results are reproducible for a fixed count. auto: the cores shared
    # out among the DVC queue's workers (`cpu_share`), all of them outside a queue.
    threads: int | Literal["auto"] = 2
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # torch: fp32, or autocast to bf16 / fp16 (fp16 with a gradient scaler, CUDA only); weights stay fp32
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    # the same numbers on any x86-64 CPU: the libraries' CPU code paths pinned (`pipeline.runtime.portable`)
    portable: bool = True

    def __post_init__(self) -> None:
        valid = self.threads == "auto" or self.threads >= 1
        check(valid, "threads", f"must be 'auto' or at least 1, got {self.threads}")
        check(not (self.portable and self.threads == "auto"), "threads",
              "auto follows the machine's cores and the queue, so results would too; runtime.portable: true "
              "needs a fixed number of threads (or set runtime.portable: false)")

    @functools.cached_property
    def thread_count(self) -> int:
        """`threads`, with auto resolved once per stage (the run's MLflow tags record it)."""
        return cpu_share.auto_threads() if self.threads == "auto" else self.threads


Runner = Callable[[Iterable[np.ndarray]], np.ndarray]  # float32 batches in the backend's layout -> probabilities


@dataclass(frozen=True)
class Shipped:
    """One exported format: its file or folder inside the export folder, and `run`, which
    computes its probabilities on float32 [0, 1] batches (in the backend's layout) the way a
    server would, in the format's own runtime, loaded once."""

    path: str
    run: Runner


@dataclass(frozen=True)
class ExportOptions:
    """What a backend's export needs of the export stage's params."""

    opset: int
    onnx_exporter: str  # torch: 'torchscript' or 'dynamo'
    batch_size: int


class Backend(ABC):
    """One framework's half of the pipeline. Constructing a backend configures the framework
    for deterministic work (seeds, threads, deterministic kernels, the device)."""

    framework: ClassVar[str]
    model_file: ClassVar[str]  # the weights' file name inside the model folder
    layout: ClassVar[str]  # the exports' input layout: "NCHW" or "NHWC"
    checkpoint_suffix: ClassVar[str]  # of the per-epoch checkpoint file fit writes and resumes from

    @abstractmethod
    def __init__(self, runtime: RuntimeParams, seed: int) -> None: ...

    @abstractmethod
    def describe(self) -> dict[str, str]:
        """What the run ran on (versions, device, threads), for MLflow tags only."""

    @abstractmethod
    def build(self, arch: str, model_args: dict[str, Any]) -> Any:
        """A fresh, randomly initialised network (seeded by the constructor)."""

    @abstractmethod
    def fit(self, model: Any, train: Split, val: Split, p: FitParams, run: StageRun | None, desc: str,
            checkpoint: Path | None = None) -> FitResult:
        """The recipe in `p`; early-stops on the unsmoothed val loss and restores the best weights.
        With `checkpoint` (a file), each epoch is saved there and a fit that finds one resumes it."""

    @abstractmethod
    def serialize(self, model: Any, card: ModelCard) -> bytes:
        """The model file's bytes: equal for equal weights, whenever and wherever saved."""

    @abstractmethod
    def deserialize(self, path: Path, card: ModelCard) -> Any:
        """The model from its file, in inference mode; never runs code stored in the file."""

    @abstractmethod
    def predict(self, model: Any, images: np.ndarray, batch_size: int) -> np.ndarray:
        """Float64 class probabilities (N, classes) for a split's uint8 (N, H, W, C) images,
        read in batches (the array may be a memory map larger than memory)."""

    @abstractmethod
    def explain(self, model: Any, images: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Grad-CAM maps (N, H, W), float32 in [0, 1], for uint8 (N, H, W, C) images, each for
        its class in `targets`; computed on the CPU, the same every rerun."""

    @abstractmethod
    def count_parameters(self, model: Any) -> int:
        """How many weights the model has (trainable or not; BatchNorm statistics excluded)."""

    @abstractmethod
    def export(
        self, model: Any, out: Path, example: np.ndarray, calibration: np.ndarray, meta: dict, options: ExportOptions
    ) -> dict[str, Shipped]:
        """Write the shipped files into `out` (a fresh folder) and return each format by name,
        for the export stage to check and time. `example` (a few uint8 NHWC test images) traces
        the graph; `calibration` (uint8 NHWC training images) calibrates quantisation; formats
        named '*int8' are quantised and checked against export's int8 thresholds."""


def softmax64(logits: np.ndarray) -> np.ndarray:
    """Probabilities in float64 whose rows sum to 1, from float32 logits (the same maths for both frameworks)."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(1, keepdims=True))
    return z / z.sum(1, keepdims=True)


def float_batches(images: np.ndarray, batch_size: int, layout: str = "NHWC") -> Iterator[np.ndarray]:
    """Float32 [0, 1] batches of a uint8 (N, H, W, C) array, read a batch at a time."""
    for start in range(0, len(images), batch_size):
        batch = np.asarray(images[start : start + batch_size], np.float32) / 255
        yield np.ascontiguousarray(batch.transpose(0, 3, 1, 2)) if layout == "NCHW" else batch
