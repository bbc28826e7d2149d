"""BatchNorm folded into the convolution before it, for a frozen backbone's inference.

In eval mode a BatchNorm is a per-channel affine map of its convolution's output, so it can
be written into that convolution's weights and bias: the same function (to float rounding)
without a pass over every activation. On 2 cores that pass was a third of EfficientNet's
forward time at 224 px (docs/benchmarks.md#audit). Only the (convolution, BatchNorm) pairs
that timm's EfficientNet family applies back to back are folded, by name per block class;
any other backbone runs as it is.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# per block class: (convolution, the BatchNorm its forward applies straight to that output),
# as timm's efficientnet.py and _efficientnet_blocks.py name them
PAIRS = {
    "EfficientNet": (("conv_stem", "bn1"), ("conv_head", "bn2")),
    "DepthwiseSeparableConv": (("conv_s2d", "bn_s2d"), ("conv_dw", "bn1"), ("conv_pw", "bn2")),
    "InvertedResidual": (("conv_s2d", "bn_s2d"), ("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3")),
    "ConvBnAct": (("conv", "bn1"),),
    "EdgeResidual": (("conv_exp", "bn1"), ("conv_pwl", "bn2")),
}


def _after_norm(bn: nn.Module | None) -> nn.Module | None:
    """What a BatchNorm applies after normalising: timm's BatchNormAct2d its dropout and
    activation, torch's BatchNorm2d nothing; None for any other module (not folded)."""
    from timm.layers.norm_act import BatchNormAct2d

    if type(bn) is BatchNormAct2d:
        return nn.Sequential(bn.drop, bn.act)
    return nn.Identity() if type(bn) is nn.BatchNorm2d else None


@torch.no_grad()
def folded(model: nn.Module) -> tuple[nn.Module, int]:
    """An eval-mode copy of `model` with each foldable BatchNorm written into its convolution;
    returns it and how many were folded. `model` itself is untouched."""
    out = copy.deepcopy(model).eval()
    count = 0
    for module in list(out.modules()):
        for conv_name, bn_name in PAIRS.get(type(module).__name__, ()):
            conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
            after = _after_norm(bn)
            if not isinstance(conv, nn.Conv2d) or after is None:
                continue
            if bn.running_mean is None or not bn.affine or conv.out_channels != bn.num_features:
                continue  # normalised by each batch's statistics, or not a per-channel map of conv's output
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = bn.bias - bn.running_mean * scale
            if conv.bias is not None:
                bias = bias + conv.bias * scale
            conv.weight.mul_(scale.reshape(-1, 1, 1, 1))
            conv.bias = nn.Parameter(bias, requires_grad=False)
            setattr(module, bn_name, after)
            count += 1
    return out, count
