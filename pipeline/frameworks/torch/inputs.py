"""A split as PyTorch model input, batch by batch, and the augmentations drawn per batch.

`Images` holds a split one of two ways:

- resident: when the split's float copy fits `RESIDENT_BYTES`, it is converted to model input
  once and kept on the device for the whole fit, so epochs skip the conversion. On MNIST-sized
  data a DataLoader's per-sample collation costs more than the model.
- streamed: a larger split stays the memory map that `formats.load_split` opened, and each batch
  reads exactly its own rows from it and converts them. Only the page cache holds the file,
  so a split larger than memory still trains; what stays in memory per image is its label and
  its place in the epoch's order (16 bytes).


Both give the same batches bit for bit: the same rows in the same order, converted by the same
`as_input`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F


def as_input(batch: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float [0, 1]; normalisation lives in the model. Float passes through."""
    x = batch.to(device, non_blocking=True)
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


RESIDENT_BYTES = 1 << 30  # splits whose float copy fits stay on the device for the whole fit; larger ones stream


def stage(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """Convert a whole uint8 (N, C, H, W) tensor to model input once when it fits, so epochs skip the work."""
    if images.numel() * 4 <= RESIDENT_BYTES:
        return as_input(images, device, channels_last)
    return images


class Images:
    """A split's images as model input, batch by batch: resident or streamed (see the module docstring).

    Built from a split's uint8 (N, H, W, C) array, usually its memory map, it picks the path by
    size. Built from an (N, C, H, W) tensor (uint8, or float in [0, 1]) it holds that tensor as
    given, which is how callers with tensors already in memory use it.
    """

    def __init__(self, images: np.ndarray | torch.Tensor, device: torch.device, channels_last: bool) -> None:
        self.device, self.channels_last = device, channels_last
        self.resident: torch.Tensor | None = None  # (N, C, H, W)
        self.streamed: np.ndarray | None = None  # uint8 (N, H, W, C), never read whole
        if isinstance(images, torch.Tensor):
            self.resident = images
        elif images.size * 4 <= RESIDENT_BYTES:
            # np.array: a writable copy (torch warns on a read-only map), freed once stage() has converted it
            self.resident = stage(torch.from_numpy(np.array(images)).permute(0, 3, 1, 2), device, channels_last)
        else:
            self.streamed = images

    def __len__(self) -> int:
        return len(self.resident if self.resident is not None else self.streamed)

    @property
    def side(self) -> int:
        """The images' width: resident (N, C, H, W), streamed (N, H, W, C); F for (N, F) features."""
        return int(self.resident.shape[-1] if self.resident is not None else self.streamed.shape[2])

    def take(self, idx: torch.Tensor) -> torch.Tensor:
        """Model input (B, C, H, W) on the device for the rows in `idx`, in idx's order."""
        if self.streamed is not None:
            # fancy indexing reads just these rows from the map into a fresh (B, H, W, C) array
            batch = torch.from_numpy(self.streamed[idx.numpy()]).permute(0, 3, 1, 2)
            if self.device.type == "cuda":  # page-locked: the copy to the GPU runs asynchronously
                batch = batch.pin_memory()
        else:
            batch = self.resident[idx]
        return as_input(batch, self.device, self.channels_last)


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by its own random offset in [-max_shift, max_shift], zero-filled."""
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)  # (N, C, H + 2s, W + 2s)
    dy, dx = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)).view(n, 1, h, 1).expand(n, c, h, w + 2 * max_shift)
    padded = padded.gather(2, rows)  # (N, C, H, W + 2s)
    cols = (dx[:, None] + torch.arange(w, device=x.device)).view(n, 1, 1, w).expand(n, c, h, w)
    return padded.gather(3, cols)  # (N, C, H, W)


def random_crop_flip(x: torch.Tensor, min_scale: float, generator: torch.Generator) -> torch.Tensor:
    """Inception-style random resized crops, each flipped left-right with probability 1/2, at
    the input's own size: a crop keeps a share of the area in [min_scale, 1] at an aspect
    ratio in [3/4, 4/3], resampled bilinearly by one batched affine grid."""
    n = x.shape[0]
    u = torch.rand((n, 5), generator=generator, dtype=torch.float64)  # drawn on the CPU: the same on any device
    area = min_scale + (1 - min_scale) * u[:, 0]
    ratio = torch.exp((2 * u[:, 1] - 1) * math.log(4 / 3))
    w, h = torch.sqrt(area * ratio).clamp(max=1), torch.sqrt(area / ratio).clamp(max=1)  # shares of each side
    theta = torch.zeros((n, 2, 3), dtype=torch.float64)
    theta[:, 0, 0] = w * torch.where(u[:, 4] < 0.5, -1.0, 1.0)
    theta[:, 0, 2] = (2 * u[:, 2] - 1) * (1 - w)  # the crop's centre, in [-1, 1] image coordinates
    theta[:, 1, 1] = h
    theta[:, 1, 2] = (2 * u[:, 3] - 1) * (1 - h)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def batches(n: int, batch_size: int, generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    """Index batches over range(n), shuffled when a generator is given."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    yield from order.split(batch_size)
