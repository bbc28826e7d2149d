"""Grad-CAM heat-maps for torch models, with TorchCAM (`torchcam.methods.GradCAM`).

Grad-CAM (Selvaraju et al., 2017) weights the last feature map's channels by the mean gradient
of the explained class's score and keeps the positive part: where the network looked for that
class. The map is taken at the feature map the model pools into its head (ScratchCNN's
`features`, a timm backbone's last feature module), upsampled bilinearly to the stored image.
Computed on the CPU in float32 with fixed inputs, so reruns give the same maps.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.frameworks.interface import float_batches
from pipeline.frameworks.torch.model import PretrainedCNN, ScratchCNN


def cam_layer(model: nn.Module) -> str | None:
    """The name of the module whose output the head pools (None: TorchCAM's own guess)."""
    if isinstance(model, ScratchCNN):
        return "features"
    if isinstance(model, PretrainedCNN):
        info = getattr(model.net, "feature_info", None)
        if info is not None:  # timm: the last feature stage, e.g. 'bn2' after EfficientNet's conv_head
            return f"net.{info[-1]['module']}"
    return None


def grad_cam(model: nn.Module, images: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(N, H, W) float32 maps in [0, 1] for uint8 (N, H, W, C) `images`, each for its class in
    `targets`; a map with no positive evidence is all zeros."""
    from torchcam.methods import GradCAM

    model = model.to(torch.device("cpu")).eval()
    side = images.shape[1:3]
    maps = np.zeros((len(images), *side), np.float32)
    with torch.enable_grad(), GradCAM(model, target_layer=cam_layer(model), input_shape=images.shape[1:][::-1]) as cam:
        for i, batch in enumerate(float_batches(images, 1, "NCHW")):
            x = torch.from_numpy(batch).requires_grad_(True)  # a graph even when every weight is frozen
            scores = model(x)
            (found,) = cam(int(targets[i]), scores, normalized=False)
            found = F.relu(found.detach().float())[None]  # (1, 1, h, w)
            up = F.interpolate(found, size=side, mode="bilinear", align_corners=False)[0, 0]
            peak = float(up.max())
            maps[i] = (up / peak).numpy() if peak > 0 else 0.0
    return maps
