"""The networks' shapes, worked out once for both frameworks: the scratch CNN's blocks, how a
model resizes its input inside itself, and what `input_size: auto` means for each model."""

from __future__ import annotations

import math

MAX_WIDTH = 256  # the scratch CNN's widest block
SCRATCH_AUTO_RANGE = (16, 64)  # train.input_size auto: the stored side, kept within this range
UPSAMPLE_LIMIT = 4  # finetune.input_size auto: a backbone sees a small image enlarged at most 4x...
PRETRAINED_MIN = 64  # ...but never below 64 px, where an ImageNet backbone's stride-32 map is 2 x 2
# images stored at least this large are photos; the auto params treat smaller ones (digits,
# letters) apart: augmentation, the share of a backbone fine-tuned, its input size
PHOTO_SIZE = 64


def pooled_blocks(input_size: int) -> int:
    """Conv blocks that halve the image: enough to bring it to about 4 px (at least two), so
    the network deepens with the input instead of its head growing with the image area."""
    return max(2, round(math.log2(max(input_size, 1) / 4)))


def scratch_blocks(input_size: int, width: int, conv3: bool) -> list[tuple[int, bool]]:
    """(output channels, pools after it) of each conv block: widths doubling from `width`
    (at most MAX_WIDTH), then with `conv3` one more block that does not pool."""
    n = pooled_blocks(input_size)
    return [(min(width * 2**i, MAX_WIDTH), i < n) for i in range(n + conv3)]


def resize_steps(image_size: int, input_size: int) -> tuple[int, bool]:
    """(k, bilinear): shrinking by 2x or more first averages k x k boxes (the anti-aliasing that
    TorchScript, ONNX, Keras and TFLite all run); bilinear then covers what is left."""
    k = image_size // input_size if image_size >= 2 * input_size else 1
    return k, image_size // k != input_size


def scratch_input_size(stored: int) -> int:
    """train.input_size auto: the stored side within SCRATCH_AUTO_RANGE (8 px digits run at 16,
    photos at 64: a CNN trained from scratch on a few thousand photos gains little from more
    pixels, and its cost grows with their square)."""
    low, high = SCRATCH_AUTO_RANGE
    return min(high, max(low, stored))


def pretrained_input_size(stored: int, pretrained: int, channels: int = 3) -> int:
    """finetune.input_size auto: the backbone's pretrained resolution, but no more than
    UPSAMPLE_LIMIT times the stored side (rounded up to a multiple of 32; enlarging an 8 px
    digit to 224 px adds compute, not detail) and no less than PRETRAINED_MIN. Small
    single-channel images (strokes, not textures: digits, letters) run at PRETRAINED_MIN, where
    MNIST digits scored higher than at 128 px in under half the time (docs/benchmarks.md#recipe-choices).
    Pets stored at 180 px run at 224, CIFAR-10 at 128, MNIST and the 8 px digits at 64."""
    if channels == 1 and stored < PHOTO_SIZE:
        return min(pretrained, PRETRAINED_MIN)
    return min(pretrained, max(PRETRAINED_MIN, 32 * math.ceil(UPSAMPLE_LIMIT * stored / 32)))
