"""The torch networks (the scratch CNN, a pretrained backbone with a new head) and their checkpoints.

Every model takes float (N, C, H, W) images in [0, 1] at the prepared size and does its own
normalisation (and, for pretrained backbones, channel expansion and resizing), so the
preprocessing travels with the weights into every export.

Their checkpoints are `checkpoint`'s; pretrained weights are read in `weights`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import PipelineError
from pipeline.frameworks import shapes

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

class WeightsError(PipelineError, ValueError):
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


class Resize(nn.Module):
    """(N, C, s, s) -> (N, C, t, t) inside the model, so every export resizes the same way
    (`shapes.resize_steps`: box averaging when shrinking 2x or more, then bilinear)."""

    def __init__(self, image_size: int, input_size: int) -> None:
        super().__init__()
        self.pool, self.bilinear = shapes.resize_steps(image_size, input_size)
        self.size = input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool > 1:
            x = F.avg_pool2d(x, self.pool)
        if self.bilinear:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x


class ScratchCNN(nn.Module):
    """resize -> [conv -> pool] x n, widths doubling from `width` -> [conv] -> head -> classes.

    n = shapes.pooled_blocks(input_size): two at 16 px, four at 64. The head is `gap` (global average
    pooling -> dense hidden -> dropout -> dense classes: its size does not depend on the image)
    or the textbook `flatten` (the feature map flattened into the dense layer)."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 1,
        image_size: int = 32,
        input_size: int | None = None,  # the side the network runs at; None: image_size
        width: int = 32,
        conv3: bool = True,  # the final conv block, which does not pool
        batch_norm: bool = True,
        dropout: float = 0.3,
        hidden: int = 128,
        head: str = "gap",
        mean: tuple[float, ...] = (0.5,),
        std: tuple[float, ...] = (0.5,),
    ) -> None:
        super().__init__()
        input_size = input_size or image_size
        self.resize = Resize(image_size, input_size)
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = []
        channels, side = in_channels, input_size
        for out, pools in shapes.scratch_blocks(input_size, width, conv3):
            layers += _conv_block(channels, out, batch_norm)
            if pools:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            channels = out
        self.features = nn.Sequential(*layers)
        if head == "gap":
            pool: list[nn.Module] = [nn.AdaptiveAvgPool2d(1), nn.Flatten()]  # (N, C, h, w) -> (N, C)
            features = channels
        elif head == "flatten":
            pool, features = [nn.Flatten()], channels * side * side  # (N, C, h, w) -> (N, C * h * w)
        else:
            raise ValueError(f"head {head!r}: expected 'gap' or 'flatten'")
        self.classifier = nn.Sequential(
            *pool,
            nn.Linear(features, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(self.normalize(self.resize(x))))


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


def pretrained_resolution(net: nn.Module) -> int:
    """The input side a backbone was trained at: timm's pretrained config, else ImageNet's 224."""
    cfg = getattr(net, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") or cfg.get("test_input_size") or (3, 224, 224)
    return int(size[-1])


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
        *,
        in_channels: int,
        image_size: int,  # the prepared images' side
        input_size: int,  # the backbone's: images are resized to it inside the model
        dropout: float = 0.2,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        net: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.expand = in_channels == 1
        self.resize = Resize(image_size, input_size)
        self.normalize = Normalize(mean, std)
        self.net = net if net is not None else create_backbone(backbone)
        replace_head(self.net, num_classes, dropout)
        self.head = head_name(self.net).rpartition(".")[0]  # the new Sequential(Dropout, Linear)
        self.freeze_batch_norm = False  # the recipe's: every backbone BatchNorm keeps its statistics

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.expand:
            x = x.expand(-1, 3, -1, -1)  # (N, 1, H, W) -> (N, 3, H, W), a view
        return self.net(self.normalize(self.resize(x)))

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
            # With freeze_batch_norm every BatchNorm keeps them (its scale and shift may still
            # learn): batch statistics of a few dozen images are too noisy to replace ImageNet's.
            for module in self.net.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    if self.freeze_batch_norm or not any(p.requires_grad for p in module.parameters()):
                        module.eval()
        return self

    @contextlib.contextmanager
    def head_removed(self) -> Iterator[nn.Module]:
        """The model without its new head, so that it outputs the pooled features (N, F) the
        head reads; yields the head."""
        parent_name, _, attr = self.head.rpartition(".")
        parent = self.net.get_submodule(parent_name) if parent_name else self.net
        head = getattr(parent, attr)
        setattr(parent, attr, nn.Identity())
        try:
            yield head
        finally:
            setattr(parent, attr, head)

    def depth_units(self) -> list[list[nn.Parameter]]:
        """The backbone's parameters by depth, input first: each top-level module a unit, and
        each stage of a stack of stages (timm's `blocks`, torchvision's `features`) its own."""
        head = {id(p) for p in self.head_parameters()}
        units = []
        for child in self.net.children():
            stack = isinstance(child, nn.Sequential | nn.ModuleList) and len(child) > 1
            for part in child.children() if stack else [child]:
                params = [p for p in part.parameters() if id(p) not in head]
                if params:
                    units.append(params)
        return units

    def param_groups(self, lr: float, layer_decay: float) -> list[dict]:
        """Optimizer groups of the trainable parameters: the head at `lr`, the backbone unit
        just below it at lr * layer_decay, the next at lr * layer_decay^2... (discriminative
        rates: the more generic the features, the less they move). The head's group is last."""
        groups = []
        units = self.depth_units()
        for depth, params in enumerate(reversed(units), start=1):
            trainable = [p for p in params if p.requires_grad]
            if trainable:
                groups.append({"params": trainable, "lr": lr * layer_decay**depth})
        groups.reverse()
        return [*groups, {"params": self.head_parameters(), "lr": lr}]


ARCHS: dict[str, type[nn.Module]] = {"scratch_cnn": ScratchCNN, "pretrained_cnn": PretrainedCNN}
