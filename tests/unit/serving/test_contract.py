"""What a served model accepts (`serving.contract`): whole pixels 0..255 in, anything it would
misread refused with one line that never carries the data."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.serving import contract


def test_whole_pixels_of_any_numeric_dtype_pass_unchanged():
    rgb = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3), dtype=np.uint8)
    assert contract.pixels(rgb) is rgb  # uint8 as held: no copy
    for dtype in (np.int64, np.float64, np.float32, np.uint16):  # JSON's numbers arrive as int64 or float64
        assert np.array_equal(contract.pixels(rgb.astype(dtype)), rgb)
    assert np.array_equal(contract.pixels(rgb.tolist()), rgb)
    one = contract.pixels(rgb[0])  # one image (H, W, C)
    assert one.shape == (1, 5, 7, 3) and np.array_equal(one[0], rgb[0])
    for channels in contract.CHANNELS:
        assert contract.pixels(np.zeros((1, 2, 2, channels), np.uint8)).shape[-1] == channels


@pytest.mark.parametrize(("values", "said"), [
    (np.full((1, 4, 4, 3), 0.5, np.float32), r"fractions in \[0.5, 0.5\]: a float image in \[0, 1\]"),
    (np.linspace(0, 1, 48).reshape(1, 4, 4, 3), r"multiply by 255 and round"),
    (np.full((1, 2, 2, 3), 255.5), r"whole numbers 0..255, got fractions in \[255.5, 255.5\]$"),
    (np.full((1, 2, 2, 1), 256), r"got values in \[256, 256\]"),
    (np.full((1, 2, 2, 1), -1), r"got values in \[-1, -1\]"),
    (np.array([[[[np.nan, 0, 0]]]]), r"NaN or infinity"),
    (np.array([[[[np.inf, 0, 0]]]]), r"NaN or infinity"),
    (np.zeros((1, 4, 4, 2), np.uint8), r"1 \(grey\), 3 \(RGB\) or 4 \(RGBA\) channels, got 2"),
    (np.zeros((1, 4, 4, 5), np.uint8), r"channels, got 5"),
    (np.zeros((4, 4), np.uint8), r"got an array of rank 2"),
    (np.zeros((1, 1, 4, 4, 3), np.uint8), r"got an array of rank 5"),
    (np.zeros((0, 4, 4, 3), np.uint8), r"no pixels to classify: shape \(0, 4, 4, 3\)"),
    (np.zeros((1, 0, 4, 3), np.uint8), r"no pixels to classify"),
    (np.zeros((3, 2048, 2048, 1), np.uint8), r"12,582,912 pixels, over the limit of 8,388,608 a request"),
    ([[[[1, 2, 3]], [[1, 2]]]], r"must share one height, width and channel count"),
    (np.ones((1, 2, 2, 3), bool), r"numbers 0..255, got bool values"),
    ("pixels", r"numbers 0..255, got <U6 values"),
])
def test_what_the_model_would_misread_is_refused_in_one_line(values, said):
    with pytest.raises(contract.Refused, match=said) as refused:
        contract.pixels(values)
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 200  # one line, never the data


def test_the_limit_is_per_request():
    side = int(contract.MAX_REQUEST_PIXELS ** 0.5)
    assert contract.pixels(np.zeros((side, side, 1), np.uint8)).shape == (1, side, side, 1)  # at the limit
    with pytest.raises(contract.Refused, match="a request"):
        contract.pixels(np.zeros((2, side, side, 1), np.uint8))
