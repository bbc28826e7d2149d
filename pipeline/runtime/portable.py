"""`runtime.portable: true`: the same numbers on any x86-64 CPU, not only on this one.

The numeric libraries pick their CPU code paths when they load: ATen's vectorised kernels,
oneDNN's convolutions and MKL's BLAS take AVX2, AVX-512 or AMX paths, whose vector widths
sum floats in different orders, so a model trained on an AVX-512 machine differs in its last
bits from one trained on an AVX2 laptop, and every hash downstream with it. Portable mode
pins each library to one path every x86-64 CPU of the last decade has (AVX2 with FMA: Intel
since Haswell, AMD since Zen) through the switches they read at load time:

- ATEN_CPU_CAPABILITY=avx2: ATen's kernels (element-wise ops, reductions, pooling);
- ONEDNN_MAX_CPU_ISA=AVX2: oneDNN's kernels (torch's convolutions; TensorFlow's contraction
  kernel where it is built with it);
- MKL_CBWR=COMPATIBLE: MKL's conditional numerical reproducibility on its SSE2 branch, the
  one branch MKL honours on both Intel and AMD CPUs (its AVX2 branch is Intel-only), with
  fixed cache-size assumptions and static scheduling (torch's matrix products on the CPU);
- TF_ENABLE_ONEDNN_OPTS=1 (always set for Keras, `frameworks.keras.backend.configure`):
  oneDNN's kernels on every CPU, where TensorFlow's own default switches them on for newer
  CPUs only; the cap above then holds them at AVX2 as it holds torch's.

The thread count is the last pin: `runtime.threads` must be a number (auto follows the
machine's cores). `pin` runs at the top of `python -m pipeline`, before torch or TensorFlow
loads; a stage process starts fresh, so environment variables set there hold for all of it
(its torchrun ranks and MLflow worker inherit them). A variable the user set is overridden,
so a shell's leftovers cannot change results. What each run computed on is recorded (`record`).
"""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

from pipeline import config

PINS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "COMPATIBLE",
}
KNOWN = (*PINS, "MKL_ENABLE_INSTRUCTIONS", "TF_ENABLE_ONEDNN_OPTS", "OMP_NUM_THREADS")


def requested(path: Path = config.PARAMS_FILE) -> bool:
    """params.yaml `runtime.portable` (true when unset); a ConfigError for a value that is not a boolean."""
    runtime = config.read_params(path).get("runtime") if path.is_file() else None
    value = runtime.get("portable", True) if isinstance(runtime, dict) else True
    if not isinstance(value, bool):
        raise config.ConfigError(f"{path}: runtime.portable: expected true or false, got {value!r}")
    return value


def pin(portable: bool) -> dict[str, str]:
    """Set the pins in this process's environment when `portable`; the ones set."""
    if not portable:
        return {}
    os.environ.update(PINS)
    return dict(PINS)


@functools.cache
def cpuinfo(field: str) -> str | None:
    """The first `field` line of /proc/cpuinfo (Linux), read once per process; None elsewhere."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    return next((line.split(":", 1)[1].strip() for line in lines if line.startswith(field)), None)


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what Python knows."""
    return cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_isa() -> str:
    """The widest vector ISA the CPU offers (avx512 / avx2 / older), from its flags."""
    flags = cpuinfo("flags")
    if flags is None:
        return platform.machine()
    names = set(flags.split())
    return next((isa for isa, flag in (("amx", "amx_tile"), ("avx512", "avx512f"), ("avx2", "avx2")) if flag in names),
                "sse")


def record(portable: bool) -> dict[str, str]:
    """The reproducibility key's machine half, as MLflow tags: the mode, the switches in force,
    the CPU and its widest ISA (the framework adds the paths its libraries chose)."""
    switches = " ".join(f"{k}={os.environ[k]}" for k in KNOWN if k in os.environ)
    return {
        "portable": str(portable).lower(),
        "numeric_switches": switches or "none",
        "cpu": cpu_model(),
        "cpu_isa": cpu_isa(),
    }
