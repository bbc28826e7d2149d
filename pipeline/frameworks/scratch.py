"""The scratch CNN's params (params.yaml `train`) and the model args derived from them and the
training split: what `train` builds and `crossval` builds again for each fold."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pipeline.config import check
from pipeline.data import formats
from pipeline.frameworks import shapes
from pipeline.frameworks.recipe import FitParams


@dataclass(frozen=True)
class TrainParams(FitParams):
    framework: Literal["torch", "keras"] = "torch"  # keras: the same network and recipe in Keras 3 on TensorFlow
    # the side the network runs at, resized inside it; auto: the stored side within 16..64 px
    input_size: int | Literal["auto"] = "auto"
    width: int = 32  # the first block's channels; each pooling block doubles them, up to 256
    head: Literal["gap", "flatten"] = "gap"  # global average pooling, or the textbook flattened feature map
    dropout: float = 0.3
    batch_norm: bool = True
    conv3: bool = True  # the final conv block, which does not pool
    hidden: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        size = self.input_size
        check(size == "auto" or 8 <= size <= 1024, "input_size", f"must be 'auto' or in 8..1024, got {size}")
        check(1 <= self.width <= 256, "width", f"must be in 1..256, got {self.width}")
        check(0 <= self.dropout < 1, "dropout", f"must be in [0, 1), got {self.dropout}")
        check(self.hidden >= 1, "hidden", f"must be at least 1, got {self.hidden}")


def channel_stats(split: formats.Split, chunk_bytes: int = 1 << 22) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of the training images in [0, 1], for the model's normalisation.

    Reads the split (usually its memory map) about `chunk_bytes` of rows at a time. The sums are
    exact integers, so the figures depend neither on the chunk size nor on summation order."""
    channels, row_values = split.channels, math.prod(split.images.shape[1:])  # uint8: a byte a value
    rows = max(1, min(chunk_bytes // max(1, row_values), (2**32 - 1) // 255**2))  # uint32 sums below cannot overflow
    total, squares = np.zeros(channels, np.int64), np.zeros(channels, np.int64)  # exact to 1.4e14 pixels a channel
    for start in range(0, len(split), rows):
        chunk = split.images[start : start + rows]
        flat = chunk.reshape(len(chunk), -1)  # (rows, H * W * C): summing down the rows is fast, across C is not
        total += flat.sum(0, dtype=np.uint32).reshape(-1, channels).sum(0, dtype=np.int64)
        squares += np.square(flat, dtype=np.uint16).sum(0, dtype=np.uint32).reshape(-1, channels).sum(0, dtype=np.int64)
    n = split.images.size // channels
    # Python ints: n * squares overflows int64 on large splits; int / int rounds correctly to float
    mean = [int(s) / (255 * n) for s in total]
    var = [(n * int(q) - int(s) ** 2) / (255**2 * n * n) for s, q in zip(total, squares, strict=True)]
    std = [max(math.sqrt(v), 1e-3) for v in var]  # a blank channel must not divide by zero
    return tuple(round(v, 6) for v in mean), tuple(round(v, 6) for v in std)


def model_args(p: TrainParams, train: formats.Split) -> dict:
    mean, std = channel_stats(train)
    return {
        "num_classes": train.num_classes,
        "in_channels": train.channels,
        "image_size": train.image_size,
        "input_size": shapes.scratch_input_size(train.image_size) if p.input_size == "auto" else p.input_size,
        "width": p.width,
        "head": p.head,
        "conv3": p.conv3,
        "batch_norm": p.batch_norm,
        "dropout": p.dropout,
        "hidden": p.hidden,
        "mean": mean,
        "std": std,
    }
