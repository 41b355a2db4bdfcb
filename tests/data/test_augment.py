"""Training augmentation: Inception's random box and flip, on TensorFlow's own resize."""

import math
from pathlib import Path

import numpy as np
import pytest

from imvec.data.augment import CROP_AREA, CROP_RATIO, augment, random_box

REFERENCE = np.load(Path(__file__).with_name("tf_resize_reference.npz"))


class WholeImage:
    """A stand-in generator whose first draw is the whole 60x45 image (area 1, aspect
    45/60), then ``flip`` decides the flip."""

    def __init__(self, flip: bool) -> None:
        self.draws = iter([1.0, math.log(45 / 60)])
        self.flip = flip

    def uniform(self, low, high):
        return next(self.draws)

    def integers(self, low, high):
        return 0

    def random(self):
        return 0.1 if self.flip else 0.9


@pytest.mark.parametrize("flip", [False, True])
def test_the_box_is_resized_as_tf_image_resize(flip):
    out = augment(REFERENCE["image_60x45"], (16, 16), WholeImage(flip))
    expected = REFERENCE["resize_60x45_to_16x16"] / 255
    assert out.dtype == np.float32 and out.flags.c_contiguous
    np.testing.assert_allclose(out, expected[:, ::-1] if flip else expected, atol=1e-6)


def test_boxes_follow_inception_bounds():
    rng = np.random.default_rng(0)
    boxes = [random_box(200, 300, rng) for _ in range(500)]
    for top, left, h, w in boxes:
        assert top >= 0 and top + h <= 200 and left >= 0 and left + w <= 300
    areas = [h * w / (200 * 300) for _, _, h, w in boxes]
    ratios = [w / h for _, _, h, w in boxes]
    assert CROP_AREA[0] * 0.95 <= min(areas) and max(areas) <= CROP_AREA[1]
    assert CROP_RATIO[0] * 0.97 <= min(ratios) and max(ratios) <= CROP_RATIO[1] * 1.03
    assert np.median(areas) < 0.6 and max(areas) > 0.85  # the whole range is used


def test_a_box_that_never_fits_is_the_whole_image():
    # A 1x400 strip: no box with aspect 3/4-4/3 and area >= 5% fits.
    assert random_box(1, 400, np.random.default_rng(0)) == (0, 0, 1, 400)


def test_output_shows_the_box():
    y, x = np.mgrid[0:200, 0:200]
    image = np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8)  # R = x, G = y
    rng = np.random.default_rng(3)
    top, left, h, w = random_box(200, 200, np.random.default_rng(3))
    out = augment(image, (40, 50), rng) * 255
    assert out.shape == (40, 50, 3)
    # Bilinear sampling with half-pixel centers stays within half a source pixel of the box.
    assert left - 0.5 <= out[..., 0].min() and out[..., 0].max() <= left + w - 0.5
    assert top - 0.5 <= out[..., 1].min() and out[..., 1].max() <= top + h - 0.5
