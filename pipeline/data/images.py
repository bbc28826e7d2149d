"""Image files in, canonical pixels out: the one place that decodes and converts images.

Ingest decodes every file once through `decode_file` to validate it and hash its pixels;
prepare and `load_for_model` (serving) go through the same `canonical` and `fit_square`, so
an image becomes the same array at train, evaluate and export time whatever its format.

Canonical pixels are uint8, (H, W) grayscale or (H, W, 3) RGB, upright:
- the EXIF orientation is applied;
- 1-bit and L stay grayscale; palette images become L when the palette is all grey, else RGB;
- 16-bit grayscale (I;16, I) is scaled to 0..255 (v * 255 / 65535, rounded), not clipped;
- alpha (LA, RGBA, PA, palette transparency) is composited on `ALPHA_BACKGROUND`;
- CMYK, YCbCr, LAB, HSV become RGB through Pillow's converters.

Nothing here imports torch: ingest and prepare run without it.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageFile, ImageOps

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
# What Pillow may identify a file with one of EXTENSIONS as. Pillow opens dozens of formats;
# anything else under an image extension (an .ico renamed .png, say) is refused.
FORMATS = ("PNG", "JPEG", "MPO", "BMP", "DIB", "GIF", "TIFF", "WEBP")
# OS and tool droppings, never data. Names starting with "." (.DS_Store, ._* AppleDouble
# files, .ipynb_checkpoints) are ignored by the same rule.
IGNORED_NAMES = frozenset({"Thumbs.db", "desktop.ini", "__MACOSX", "@eaDir"})
ALPHA_BACKGROUND = 255  # transparent pixels become white, in every channel
GRAYSCALE_16 = ("I;16", "I;16L", "I;16B", "I;16N", "I")
Resize = Literal["stretch", "crop", "pad"]

# Truncated files are rejected, never padded with grey; our own pixel limit replaces
# Pillow's warning-then-error heuristic so the message names the data.max_pixels setting.
ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = None


class Rejected(Exception):
    """A file that cannot be used; `code` groups reasons for the report, the message says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Limits:
    max_pixels: int  # width x height claimed by the header, checked before decoding
    min_side: int


def is_ignored(name: str) -> bool:
    """Hidden files and OS metadata (.DS_Store, ._*, Thumbs.db) are never images."""
    return name.startswith(".") or name in IGNORED_NAMES


def has_image_extension(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in EXTENSIONS


def decode_file(path: Path, limits: Limits) -> tuple[np.ndarray, str]:
    """Decode one file safely into canonical pixels; returns (pixels, the file's own mode).

    Raises Rejected, never anything else: one bad file must not stop the stage. Only the
    header is read before the size checks, so a decompression bomb costs microseconds."""
    path = Path(path)
    try:
        size = path.stat().st_size  # follows symlinks
    except FileNotFoundError:
        if path.is_symlink():
            raise Rejected("broken_symlink", f"broken symbolic link to {os.readlink(path)}") from None
        raise Rejected("unreadable", "file disappeared while reading") from None
    except OSError as exc:
        raise Rejected("unreadable", f"cannot stat: {exc.strerror}") from None
    if size == 0:
        raise Rejected("empty", "empty file (0 bytes)")
    try:
        with Image.open(path) as image:  # parses the header only
            if image.format not in FORMATS:
                raise Rejected("unsupported_format", f"{image.format} data, not one of {', '.join(FORMATS)}")
            check_size(image.size, limits)
            image.seek(0)  # animated GIF / WebP, multi-page TIFF: the first frame
            image.load()
            return canonical(image), image.mode
    except Rejected:
        raise
    except PermissionError as exc:
        raise Rejected("unreadable", f"permission denied ({exc.strerror})") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, MemoryError) as exc:
        # UnidentifiedImageError (not an image) and "image file is truncated" are OSErrors.
        raise Rejected("undecodable", f"cannot decode: {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # a decoder bug must cost one file, not the run
        raise Rejected("undecodable", f"decoder failed: {type(exc).__name__}: {exc}") from None


def check_size(size: tuple[int, int], limits: Limits) -> None:
    width, height = size
    if width * height > limits.max_pixels:
        raise Rejected(
            "too_many_pixels",
            f"header claims {width}x{height} = {width * height:,} pixels, over data.max_pixels {limits.max_pixels:,} "
            "(a decompression bomb or an image to downscale first)",
        )
    if min(width, height) < limits.min_side:
        raise Rejected("too_small", f"{width}x{height} pixels, a side under data.min_side {limits.min_side}")


def canonical(image: Image.Image) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3), upright, alpha flattened: see the module docstring."""
    image = ImageOps.exif_transpose(image)
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        palette_grey = image.mode == "RGB" and _all_grey(image)
        mode = image.mode
        if palette_grey:
            return np.asarray(image.convert("L"))
    elif mode == "PA":
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("1", "L"):
        return np.asarray(image.convert("L"))
    if mode in GRAYSCALE_16:
        values = np.asarray(image).astype(np.int64)
        if values.size and (values.min() < 0 or values.max() > 65535):
            raise Rejected("unsupported_mode", f"{mode} pixels outside the 16-bit range 0..65535")
        return ((values * 255 + 32767) // 65535).astype(np.uint8)
    if mode in ("LA", "La"):
        pixels = np.asarray(image.convert("LA"))
        return composite(pixels[..., 0], pixels[..., 1])
    if mode in ("RGBA", "RGBa"):
        pixels = np.asarray(image.convert("RGBA"))
        return composite(pixels[..., :3], pixels[..., 3:])
    if mode in ("RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(image.convert("RGB"))
    raise Rejected("unsupported_mode", f"pixel mode {mode} (valid: 1, L, P, LA, RGB, RGBA, CMYK, YCbCr, "
                                       "16-bit grayscale)")


def _all_grey(image: Image.Image) -> bool:
    pixels = np.asarray(image)
    return bool((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all())


def composite(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """color over ALPHA_BACKGROUND by alpha, rounded: fully opaque pixels keep their value."""
    alpha = alpha.astype(np.uint32)
    blended = (color.astype(np.uint32) * alpha + ALPHA_BACKGROUND * (255 - alpha) + 127) // 255
    return blended.astype(np.uint8)


def phash(pixels: np.ndarray) -> str:
    """64-bit DCT perceptual hash as 16 hex digits, bit for bit imagehash.phash's.

    Same recipe (greyscale, 32x32 Lanczos, 2-D DCT-II, top-left 8x8 against its median) with
    the DCT as two small matrix products: 20x faster than scipy.fftpack per image."""
    image = Image.fromarray(pixels)
    if image.mode != "L":
        image = image.convert("L")
    small = np.asarray(image.resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT @ small @ _DCT.T)[:8, :8].ravel()
    middle = np.sort(low)[31:33]  # np.median of 64 values, without its per-call overhead
    bits = low > (middle[0] + middle[1]) / 2
    return np.packbits(bits).tobytes().hex()


def _dct_matrix(n: int) -> np.ndarray:
    # scipy.fftpack.dct type II, unnormalised: y[k] = 2 * sum_i x[i] cos(pi k (2i + 1) / 2n)
    k, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    return 2 * np.cos(np.pi * k * (2 * i + 1) / (2 * n))


_DCT = _dct_matrix(32)[:8]  # only the 8 lowest frequencies are ever used


def colourfulness(pixels: np.ndarray) -> float:
    """Hasler and Suesstrunk's colourfulness of canonical pixels: 0 for grey ones (L, or RGB
    with R = G = B), about 15 for a slightly colourful photo, 33 moderately, 59 quite; a tint
    over the whole image (a sepia scan) counts for only 0.3 of its strength."""
    if pixels.ndim == 2:
        return 0.0
    rgb = pixels.astype(np.float32)
    rg = rgb[..., 0] - rgb[..., 1]
    yb = (rgb[..., 0] + rgb[..., 1]) / 2 - rgb[..., 2]
    spread = np.sqrt(rg.var(dtype=np.float64) + yb.var(dtype=np.float64))
    tint = np.sqrt(rg.mean(dtype=np.float64) ** 2 + yb.mean(dtype=np.float64) ** 2)
    return round(float(spread + 0.3 * tint), 3)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit distances between uint64 hashes, broadcast: a[:, None] against b[None, :]."""
    return np.bitwise_count(np.bitwise_xor(a[:, None], b[None, :]))


def hashes_to_uint64(hex_hashes: list[str] | np.ndarray) -> np.ndarray:
    return np.array([int(h, 16) for h in hex_hashes], dtype=np.uint64)


def fit_square(pixels: np.ndarray, size: int, channels: int, resize: Resize = "stretch") -> np.ndarray:
    """Canonical pixels -> uint8 (size, size, channels), the array the model is trained on.

    stretch: scale each side to `size` (aspect ratio changes); crop: scale the short side to
    `size`, then cut the centre; pad: scale the long side to `size`, then centre it on
    ALPHA_BACKGROUND. Pillow's bilinear filter widens with the scale, so shrinking averages."""
    if pixels.shape[:2] == (size, size) and (pixels.ndim == 3) == (channels == 3):
        return pixels.reshape(size, size, channels)  # already the training shape (MNIST at 28): no copy
    image = Image.fromarray(pixels)
    if channels == 3 and image.mode == "L":
        image = image.convert("RGB")  # replicate grey into the three channels
    elif channels == 1 and image.mode != "L":
        image = image.convert("L")  # grey content in an RGB file (prepare stores such datasets as L): exact
    width, height = image.size
    if (width, height) != (size, size):
        if resize == "stretch":
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        else:
            scale = size / (min if resize == "crop" else max)(width, height)
            new = (max(1, round(width * scale)), max(1, round(height * scale)))
            image = image.resize(new, Image.Resampling.BILINEAR)
            if resize == "crop":
                left, top = (new[0] - size) // 2, (new[1] - size) // 2
                image = image.crop((left, top, left + size, top + size))
            else:
                canvas = Image.new(image.mode, (size, size), (ALPHA_BACKGROUND,) * len(image.getbands()))
                canvas.paste(image, ((size - new[0]) // 2, (size - new[1]) // 2))
                image = canvas
    return np.asarray(image).reshape(size, size, channels)


def load_for_model(
    path: Path, size: int, channels: int, resize: Resize = "stretch", limits: Limits | None = None
) -> np.ndarray:
    """A new image file as the exported model expects it: (size, size, channels) uint8.

    The values come from the export's model.json "input" block; this is exactly what prepare
    did to the training images."""
    limits = limits or Limits(max_pixels=64_000_000, min_side=1)  # still no decompression bombs at serving time
    pixels, _ = decode_file(Path(path), limits)
    return fit_square(pixels, size, channels, resize)


def array_for_model(pixels: np.ndarray, size: int, channels: int, resize: Resize = "stretch") -> np.ndarray:
    """An image array as a user holds it, uint8 (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) of any
    size, as the exported model expects it: the rules `load_for_model` applies to a file (alpha
    on ALPHA_BACKGROUND, grey or RGB as trained, `resize` to `size`). Raises Rejected."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (1, 3, 4)):
        raise Rejected("unsupported_array", f"expected uint8 pixels of shape (H, W), (H, W, 1), (H, W, 3) or "
                                            f"(H, W, 4), got {pixels.dtype} {pixels.shape}")
    if min(pixels.shape[:2]) < 1:
        raise Rejected("too_small", f"an image of {pixels.shape[1]}x{pixels.shape[0]} pixels")
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    return fit_square(canonical(Image.fromarray(np.ascontiguousarray(pixels))), size, channels, resize)
