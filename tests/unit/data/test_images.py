"""images: every file decoded safely, every pixel format converted one explicit way."""

import io
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.data import images

LIMITS = images.Limits(max_pixels=10_000_000, min_side=8)


def save(path, image: Image.Image, fmt: str | None = None, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **kwargs)
    return path


def gradient(width=16, height=12) -> np.ndarray:
    return (np.arange(width * height).reshape(height, width) * 255 // (width * height)).astype(np.uint8)


def rejected(path, limits=LIMITS) -> images.Rejected:
    with pytest.raises(images.Rejected) as info:
        images.decode_file(path, limits)
    return info.value


@pytest.mark.parametrize("fmt, ext", [("PNG", "png"), ("BMP", "bmp"), ("TIFF", "tif"), ("GIF", "gif")])
def test_lossless_formats_decode_to_the_same_grayscale_pixels(tmp_path, fmt, ext):
    pixels = gradient()
    decoded, mode = images.decode_file(save(tmp_path / f"a.{ext}", Image.fromarray(pixels), fmt), LIMITS)
    assert decoded.dtype == np.uint8 and decoded.shape == (12, 16)
    assert np.array_equal(decoded, pixels), mode


def test_jpeg_and_webp_decode_to_rgb(tmp_path):
    rgb = np.dstack([gradient(), gradient()[::-1], np.full((12, 16), 90, np.uint8)])
    jpeg, _ = images.decode_file(save(tmp_path / "a.jpg", Image.fromarray(rgb), quality=95), LIMITS)
    webp, _ = images.decode_file(save(tmp_path / "a.webp", Image.fromarray(rgb), lossless=True), LIMITS)
    assert jpeg.shape == webp.shape == (12, 16, 3)
    assert np.array_equal(webp, rgb)
    assert np.abs(jpeg.astype(int) - rgb).mean() < 8  # lossy, but the same picture


def test_an_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.fromarray(np.full((10, 10), v, np.uint8)) for v in (40, 200)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100)
    decoded, _ = images.decode_file(path, LIMITS)
    assert decoded.shape == (10, 10) and int(decoded.mean()) == 40


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32768, 65535] * 4] * 8, dtype=np.uint16)
    decoded, mode = images.decode_file(save(tmp_path / "a.png", Image.fromarray(values)), LIMITS)
    assert mode == "I;16"
    assert decoded.dtype == np.uint8
    assert decoded[0, :4].tolist() == [0, 1, 128, 255]  # clipping would give [0, 255, 255, 255]
    tiff, _ = images.decode_file(save(tmp_path / "a.tif", Image.fromarray(values)), LIMITS)
    assert np.array_equal(tiff, decoded)


def test_alpha_is_composited_on_the_fixed_background(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    decoded, _ = images.decode_file(save(tmp_path / "a.png", Image.fromarray(rgba, "RGBA")), LIMITS)
    assert decoded.shape == (8, 8, 3)
    assert decoded[0, 0].tolist() == [200, 0, 0]
    assert decoded[7, 7].tolist() == [images.ALPHA_BACKGROUND] * 3
    la = np.stack([np.full((8, 8), 10, np.uint8), np.full((8, 8), 128, np.uint8)], -1)
    decoded, _ = images.decode_file(save(tmp_path / "la.png", Image.fromarray(la, "LA")), LIMITS)
    assert decoded.shape == (8, 8)
    assert decoded[0, 0] == round((10 * 128 + 255 * 127) / 255)


def test_palette_images_become_grey_or_rgb_by_their_palette(tmp_path):
    grey = Image.fromarray(gradient()).convert("P")
    decoded, mode = images.decode_file(save(tmp_path / "grey.png", grey), LIMITS)
    assert mode == "P" and decoded.ndim == 2
    colour = Image.fromarray(np.dstack([gradient(), np.zeros((12, 16), np.uint8), gradient()])).convert("P")
    decoded, _ = images.decode_file(save(tmp_path / "colour.png", colour), LIMITS)
    assert decoded.ndim == 3
    transparent = Image.new("P", (8, 8), 1)
    transparent.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    transparent.info["transparency"] = 1
    decoded, _ = images.decode_file(save(tmp_path / "t.png", transparent, transparency=1), LIMITS)
    assert decoded[0, 0].tolist() == [images.ALPHA_BACKGROUND] * 3


def test_cmyk_becomes_rgb(tmp_path):
    cmyk = Image.new("CMYK", (10, 10), (0, 255, 255, 0))  # no cyan, full magenta and yellow: red
    decoded, mode = images.decode_file(save(tmp_path / "a.tif", cmyk), LIMITS)
    assert mode == "CMYK" and decoded[0, 0].tolist() == [255, 0, 0]
    jpeg, _ = images.decode_file(save(tmp_path / "a.jpg", cmyk, quality=100), LIMITS)
    assert jpeg.shape == (10, 10, 3) and jpeg[0, 0, 0] > 200 and jpeg[0, 0, 1:].max() < 60


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((8, 16), np.uint8)
    pixels[:, :4] = 255  # a bright left edge, 16 wide and 8 tall
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    decoded, _ = images.decode_file(save(tmp_path / "a.jpg", image, exif=exif, quality=100), LIMITS)
    assert decoded.shape == (16, 8)  # upright: now 8 wide and 16 tall
    assert decoded[:4].mean() > 200 and decoded[-4:].mean() < 50  # the left edge is now on top


def test_empty_truncated_and_fake_files_are_rejected_with_reasons(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    assert rejected(tmp_path / "empty.png").code == "empty"
    whole = save(tmp_path / "whole.png", Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)))
    (tmp_path / "cut.png").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    assert rejected(tmp_path / "cut.png").code == "undecodable"
    (tmp_path / "text.jpg").write_text("this is not a picture\n" * 10)
    assert rejected(tmp_path / "text.jpg").code == "undecodable"
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    assert rejected(tmp_path / "garbage.png").code == "undecodable"
    save(tmp_path / "icon.png", Image.fromarray(gradient()), "ICO")
    assert rejected(tmp_path / "icon.png").code == "unsupported_format"


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header claiming width x height 8-bit grey pixels, with almost no data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")
    )


def test_a_decompression_bomb_is_rejected_from_its_header_without_decoding(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    path.write_bytes(png_bomb(100_000, 100_000))  # 10^10 pixels claimed in a few hundred bytes

    def no_decoding(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(Image.Image, "load", no_decoding)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", no_decoding)
    error = rejected(path)
    assert error.code == "too_many_pixels"
    assert "100000x100000" in str(error) and "data.max_pixels" in str(error)


def test_images_under_the_minimum_side_are_rejected(tmp_path):
    error = rejected(save(tmp_path / "tiny.png", Image.fromarray(np.zeros((4, 30), np.uint8))))
    assert error.code == "too_small" and "30x4" in str(error)


def test_broken_symlinks_and_unreadable_files_are_rejected(tmp_path, monkeypatch):
    (tmp_path / "link.png").symlink_to(tmp_path / "gone.png")
    error = rejected(tmp_path / "link.png")
    assert error.code == "broken_symlink" and "gone.png" in str(error)
    locked = save(tmp_path / "locked.png", Image.fromarray(gradient()))
    locked.chmod(0)
    try:
        if os.geteuid() == 0:  # root reads it anyway: make the open fail as it would for a user
            monkeypatch.setattr(
                Image, "open", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")),
            )
        error = rejected(locked)
        assert error.code == "unreadable" and "permission denied" in str(error)
    finally:
        locked.chmod(0o644)


def test_ignore_rules():
    for name in (".DS_Store", "._photo.jpg", ".hidden.png", "Thumbs.db", "desktop.ini", "__MACOSX"):
        assert images.is_ignored(name), name
    assert not images.is_ignored("photo.jpg")
    assert images.has_image_extension("A.JPEG") and images.has_image_extension("b.webp")
    assert not images.has_image_extension("notes.txt")


def test_phash_matches_imagehash_and_finds_near_twins():
    imagehash = pytest.importorskip("imagehash")
    rng = np.random.default_rng(0)
    samples = [rng.integers(0, 255, (28, 28), np.uint8) for _ in range(20)]
    samples += [rng.integers(0, 255, (20, 33, 3), np.uint8)]
    for pixels in samples:
        assert images.phash(pixels) == str(imagehash.phash(Image.fromarray(pixels)))
    # a smooth picture (random 4x4 blobs upscaled); its near-twins are it resized and re-encoded
    rng = np.random.default_rng(1)
    base = Image.fromarray(rng.integers(0, 255, (4, 4), np.uint8)).resize((32, 32), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    base.save(buffer, "JPEG", quality=70)
    twins = [np.asarray(base.resize((24, 24), Image.Resampling.BILINEAR)), np.asarray(Image.open(buffer))]
    other = np.asarray(
        Image.fromarray(rng.integers(0, 255, (4, 4), np.uint8)).resize((32, 32), Image.Resampling.BICUBIC),
    )
    pictures = [np.asarray(base), *twins, other, np.asarray(base).T[::-1]]
    hashes = images.hashes_to_uint64([images.phash(p) for p in pictures])
    distance = images.hamming(hashes, hashes)[0]
    assert distance[1:3].max() <= 8 < 16 <= distance[3:].min(), distance


@pytest.mark.parametrize("resize", ["stretch", "crop", "pad"])
def test_fit_square_gives_the_training_shape(resize):
    wide = np.zeros((10, 40), np.uint8)
    wide[:, 15:25] = 255
    out = images.fit_square(wide, 16, 1, resize)
    assert out.shape == (16, 16, 1) and out.dtype == np.uint8
    assert images.fit_square(wide, 16, 3, resize).shape == (16, 16, 3)
    if resize == "pad":
        assert (out[0] == images.ALPHA_BACKGROUND).all()  # bars above and below
    if resize == "crop":
        assert out.mean() > 200  # the bright centre fills the crop
    grey_rgb = np.repeat(wide[..., None], 3, axis=2)  # grey pixels in an RGB file: stored as one channel, exactly
    np.testing.assert_array_equal(images.fit_square(grey_rgb, 16, 1, resize), out)


def test_colourfulness_is_zero_for_grey_pixels_in_any_mode_and_high_for_photos():
    import skimage.data

    grey = skimage.data.camera()
    assert images.colourfulness(grey) == 0.0
    assert images.colourfulness(np.repeat(grey[..., None], 3, axis=2)) == 0.0
    buffer = io.BytesIO()
    Image.fromarray(grey).convert("RGB").save(buffer, "JPEG", quality=75)  # grey saved as an RGB JPEG
    assert images.colourfulness(np.asarray(Image.open(buffer).convert("RGB"))) < 1
    assert images.colourfulness(skimage.data.chelsea()) > 30 and images.colourfulness(skimage.data.coffee()) > 60


def test_load_for_model_is_what_prepare_stores(tmp_path):
    cmyk = Image.new("CMYK", (20, 12), (0, 255, 255, 0))
    path = save(tmp_path / "a.tif", cmyk)
    pixels, _ = images.decode_file(path, LIMITS)
    assert np.array_equal(images.load_for_model(path, 16, 3, "pad"), images.fit_square(pixels, 16, 3, "pad"))


def test_a_buffer_roundtrip_keeps_png_bytes_stable():
    # Pillow writes no timestamp into PNGs: the same pixels give the same file
    encode = lambda: (lambda b: (Image.fromarray(gradient()).save(b, "PNG"), b.getvalue())[1])(io.BytesIO())  # noqa: E731
    assert encode() == encode()
