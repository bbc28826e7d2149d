"""Seeding, determinism switches and device choice for torch (params.yaml `runtime`).

Byte-identical reruns need three things pinned: every random generator's seed, the choice of
deterministic kernels, and the intra-op thread count (a different number of threads sums
floats in a different order). All three come from params so DVC tracks them.
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any

import numpy as np
import torch

from pipeline.config import ConfigError
from pipeline.frameworks.interface import RuntimeParams
from pipeline.runtime import portable


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator for data order and augmentation."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    return torch.Generator().manual_seed(seed)


def set_deterministic() -> None:
    """torch.use_deterministic_algorithms(True), without its import of torch._inductor.config.

    That import costs 2.4 s a stage here and only matters to torch.compile, which no stage
    uses; once inductor is loaded (a stage that compiles), the public call sets both flags.
    """
    if "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(True)
    else:
        torch._C._set_deterministic_algorithms(True)


def configure(params: RuntimeParams) -> torch.device:
    """Switch on deterministic kernels, pin threads and pick the device."""
    # cuBLAS reads this when CUDA initialises; without it deterministic mode raises on matmul.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    set_deterministic()
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.set_num_threads(params.thread_count)
    if params.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "params.yaml: runtime.device is 'cuda' but torch sees no CUDA device; "
            "use 'auto' or 'cpu'"
        )
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if params.device == "auto" else params.device)
    if params.precision == "fp16" and device.type != "cuda":
        raise ConfigError("params.yaml: runtime.precision fp16 needs a CUDA device (its gradient scaler); "
                          "use bf16 or fp32 on the CPU")
    global PRECISION
    PRECISION = params.precision
    return device


PRECISION = "fp32"  # runtime.precision, set by configure: what `autocast` computes in
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device) -> Any:
    """Mixed precision for forward passes (a no-op in fp32): matmuls and convolutions in
    bf16/fp16, reductions and the loss in fp32, the weights fp32 throughout."""
    return torch.autocast(device.type, dtype=DTYPES.get(PRECISION, torch.float32), enabled=PRECISION != "fp32")


def grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """fp16's loss scaling (its small range underflows gradients); for fp32 and bf16 a scaler
    that passes everything through unchanged."""
    return torch.amp.GradScaler(device.type, enabled=PRECISION == "fp16")


def describe(device: torch.device, params: RuntimeParams) -> dict[str, str]:
    """What the run ran on, for MLflow tags (never for DVC-tracked files)."""
    info = {
        "torch": torch.__version__,
        "device": str(device),
        "threads": str(params.thread_count),
        "precision": params.precision,
        "deterministic": "true",
        **portable.record(params.portable),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the path ATen's kernels took
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
