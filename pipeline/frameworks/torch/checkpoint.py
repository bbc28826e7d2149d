"""A torch model file's checkpoint: plain containers, `{"arch", "model_args", "classes",
"state_dict"}`, loadable with `torch.load(..., weights_only=True)`; `load_checkpoint` rebuilds
the model (`model.ARCHS`) from it."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import ArtifactError
from pipeline.frameworks.torch.model import ARCHS


def build(arch: str, model_args: dict[str, Any]) -> nn.Module:
    if arch not in ARCHS:
        raise ValueError(f"unknown arch '{arch}'; known: {sorted(ARCHS)}")
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in model_args.items()}
    return ARCHS[arch](**args)


def checkpoint_bytes(model: nn.Module, arch: str, model_args: dict[str, Any], classes: tuple[str, ...]) -> bytes:
    """The checkpoint, serialised in memory: torch.save into a named file puts the file name
    inside the archive, so a temporary name would change the bytes."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    blob = {
        "arch": arch,
        "model_args": {k: list(v) if isinstance(v, tuple) else v for k, v in model_args.items()},
        "classes": list(classes),
        "state_dict": state,
    }
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    return buffer.getvalue()


def refusal_reason(exc: BaseException) -> str:
    """The first line of why torch.load(weights_only=True) refused a file, without torch's advice
    to retry with weights_only=False: that would run the file's code, so it is not ours to give."""
    return str(exc).split("WeightsUnpickler error:")[-1].strip().splitlines()[0][:200]


def load_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model (eval mode, CPU) from a checkpoint; also return the checkpoint dict."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: checkpoint not found; run the stage that trains it") from None
    except Exception as exc:
        raise ArtifactError(f"{path}: refused: not a plain tensor checkpoint ({refusal_reason(exc)}); this "
                            "pipeline never unpickles code. Rerun the stage that trains it") from exc
    missing = {"arch", "model_args", "classes", "state_dict"} - set(ckpt) if isinstance(ckpt, dict) else {"all"}
    if missing:
        raise ArtifactError(f"{path}: not a pipeline checkpoint (missing {sorted(missing)})")
    model = build(ckpt["arch"], ckpt["model_args"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, ckpt
