"""What a shipped model accepts as pixels, wherever arrays come in: `serving.pyfunc`, behind
MLflow's `load_model(...).predict` and `mlflow models serve`. (`serving.predict` reads files,
which decode to such pixels or get a row with their error.)

Accepted: a batch (N, H, W, C) or one image (H, W, C), C 1 (grey), 3 (RGB) or 4 (RGBA), whole
numbers 0..255 of any numeric dtype (uint8 as held; JSON's numbers arrive as int64 or float64),
at most MAX_REQUEST_PIXELS pixels (N x H x W) a call (image files: `data.images.load_for_model`'s
header check, 64 M pixels an image, as they are streamed in batches). Refused,
with one line that names what was wrong and never the data: other ranks or channel counts,
an empty batch or image, NaN or infinities, fractions (a float image in [0, 1], as
torchvision's ToTensor makes: multiply by 255 and round), values outside 0..255, booleans,
strings, images of different sizes in one batch. Nothing is cast silently: a value that
would change on the way to uint8 is refused.
"""

from __future__ import annotations

import numpy as np

# a request's pixels, N x H x W: 32 images of 512x512 or one of 2896x2896. It bounds the model's
# work; MLflow parses a request's JSON before the model sees it (docs/mlflow.md#what-a-served-model-accepts)
MAX_REQUEST_PIXELS = 8_388_608
CHANNELS = (1, 3, 4)


class Refused(ValueError):
    """Pixels the model would misread; the message is one line for the caller."""


def pixels(values: object) -> np.ndarray:
    """`values` as a uint8 batch (N, H, W, C) under this module's contract; raises Refused."""
    ragged = Refused("images of one request must share one height, width and channel count "
                     "(send images of other sizes in requests of their own)")
    try:
        array = np.asarray(values)
    except ValueError:  # nested lists of unequal lengths
        raise ragged from None
    if array.dtype == object:
        raise ragged
    if array.dtype.kind not in "uif":
        raise Refused(f"pixels must be numbers 0..255, got {array.dtype} values")
    if array.ndim == 3:
        array = array[None]  # one image
    if array.ndim != 4:
        raise Refused(f"expected images (N, H, W, C) or one image (H, W, C), got an array of rank {array.ndim}, "
                      f"shape {array.shape}")
    n, height, width, channels = array.shape
    if channels not in CHANNELS:
        raise Refused(f"expected 1 (grey), 3 (RGB) or 4 (RGBA) channels, got {channels} (shape {array.shape})")
    if n == 0 or height == 0 or width == 0:
        raise Refused(f"no pixels to classify: shape {array.shape}")
    if n * height * width > MAX_REQUEST_PIXELS:
        raise Refused(f"{n} image(s) of {width}x{height} are {n * height * width:,} pixels, over the limit of "
                      f"{MAX_REQUEST_PIXELS:,} a request: send fewer or smaller images")
    if array.dtype == np.uint8:
        return array
    if array.dtype.kind == "f":
        if not np.isfinite(array).all():
            raise Refused("pixels must be numbers 0..255, got NaN or infinity")
        if not (array == np.round(array)).all():
            low, high = float(array.min()), float(array.max())
            hint = (": a float image in [0, 1] (torchvision's ToTensor)? multiply by 255 and round"
                    if low >= 0 and high <= 1 else "")
            raise Refused(f"pixels must be whole numbers 0..255, got fractions in [{low:g}, {high:g}]{hint}")
    low, high = array.min(), array.max()
    if low < 0 or high > 255:
        raise Refused(f"pixels must be whole numbers 0..255, got values in [{low:g}, {high:g}]")
    return array.astype(np.uint8)
