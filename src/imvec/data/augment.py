"""Training augmentation on the extraction pipeline's own resize.

TF-Slim's Inception preprocessing, which trained these networks, crops a random box
covering 5-100% of the image with aspect ratio 3/4-4/3 and flips it horizontally half the
time (its colour distortion is left out). The box is resized with the same TF-exact
bilinear resize as evaluation and extraction (:mod:`imvec.data.resize`), so a model sees
one kind of pixels in training, evaluation, ``imvec predict`` and ``imvec extract``.
"""

from __future__ import annotations

import math

import numpy as np

from imvec.data.preprocess import to_unit_range
from imvec.data.resize import resize_bilinear

__all__ = ["AUGMENTATION", "CROP_AREA", "CROP_ATTEMPTS", "CROP_RATIO", "augment",
           "random_box"]

CROP_AREA = (0.05, 1.0)  # TF-Slim inception_preprocessing.distorted_bounding_box_crop
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 100
AUGMENTATION = ("random box (area 5-100%, aspect 3/4-4/3) resized as extraction resizes, "
                "horizontal flip p=0.5")


def random_box(height: int, width: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """``(top, left, box height, box width)``: area and aspect ratio are drawn until the
    box fits, else the whole image."""
    area = width * height
    for _ in range(CROP_ATTEMPTS):
        target = area * rng.uniform(*CROP_AREA)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return top, left, h, w
    return 0, 0, height, width


def augment(image: np.ndarray, size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A random box of ``image`` (uint8 ``[H, W, 3]``), resized to ``size`` (height, width)
    and flipped half the time: float32 ``[height, width, 3]`` in [0, 1]."""
    top, left, h, w = random_box(image.shape[0], image.shape[1], rng)
    out = resize_bilinear(image[top:top + h, left:left + w], size)
    if rng.random() < 0.5:
        out = np.ascontiguousarray(out[:, ::-1])
    return to_unit_range(out)
