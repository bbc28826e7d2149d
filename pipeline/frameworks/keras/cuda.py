"""TensorFlow's CUDA 12 libraries beside torch's CUDA 13 ones, in one virtual environment.

`make setup-gpu` swaps the pinned tensorflow-cpu for TensorFlow 2.21's CUDA build, whose
libraries are NVIDIA's CUDA 12 wheels (requirements-gpu.txt). torch 2.14's CUDA 13 wheels
install cuDNN and NCCL at the very paths those use (site-packages/nvidia/cudnn/lib,
nvidia/nccl/lib, the same file names), so installing one would overwrite the other's. The CUDA 12
wheels therefore go to a folder of their own, `<venv>/tensorflow-cuda12`, and a keras stage
loads them from there before TensorFlow starts: TensorFlow opens its libraries by name
(libcudnn.so.9, libcublas.so.12, ...), and the dynamic loader hands back a library of that
name already loaded, whatever folder it came from. Each library finds its own CUDA 12
companions through its relative search path inside that folder. torch never runs in a keras
process (tested), so the two sets never meet.
"""

from __future__ import annotations

import ctypes
import sys
from pathlib import Path

FOLDER = "tensorflow-cuda12"  # in the virtual environment (sys.prefix); `make setup-gpu` fills it


def libraries(root: Path) -> list[Path]:
    """The shared libraries of the CUDA 12 wheels under `root` (nvidia/<package>/lib/lib*.so.N), sorted."""
    return sorted(p for p in (root / "nvidia").glob("*/lib/lib*.so.*") if p.is_file())


def preload(root: Path | None = None) -> list[str]:
    """Load every CUDA 12 library under `root` (default: the environment's FOLDER), globally, so
    that TensorFlow's own loads find them; the names loaded. Nothing when the folder is absent
    (the pinned tensorflow-cpu). A library that needs the NVIDIA driver (libcuda.so.1) does not
    load on a machine without one, where TensorFlow has no GPU to use either: it is skipped."""
    root = Path(sys.prefix) / FOLDER if root is None else root
    loaded = []
    for path in libraries(root):
        try:
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded.append(path.name)
    return loaded
