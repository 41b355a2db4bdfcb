"""The preprocessing of a job, as one value: recorded with the features, compared on resume.

An image goes: decode (EXIF orientation applied, any mode -> RGB, pixel limit from the
header) -> optional central crop -> bilinear resize to the module's size -> float32 in
[0, 1], exactly as a TF-Hub user's ``tf.image.central_crop`` + ``tf.image.resize`` + ``/ 255``.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

from imvec.data.decode import DEFAULT_MAX_PIXELS, decode_rgb
from imvec.data.resize import central_crop, resize_bilinear

__all__ = ["RESIZE_METHOD", "Preprocessing"]

RESIZE_METHOD = "bilinear, half-pixel centers, no antialias (TF2 tf.image.resize)"


@dataclass(frozen=True)
class Preprocessing:
    """``size`` (height, width) the module gets; ``crop``: central fraction kept first."""

    size: tuple[int, int]
    crop: float | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be (height, width) >= 1; got {self.size}")
        object.__setattr__(self, "size", (int(self.size[0]), int(self.size[1])))
        if self.crop is not None and not 0.0 < self.crop <= 1.0:
            raise ValueError(f"crop must be a fraction in (0, 1], e.g. 0.875; got {self.crop}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive (or None for no limit); "
                             f"got {self.max_pixels}")

    def __call__(self, source: str | os.PathLike | bytes) -> np.ndarray:
        """``[height, width, 3]`` float32 in [0, 1]; raises ``ImageDecodeError``."""
        image = decode_rgb(source, self.max_pixels)
        if self.crop is not None:
            image = central_crop(image, self.crop)
        out = resize_bilinear(image, self.size)
        out *= np.float32(1 / 255)
        return out

    def describe(self) -> dict:
        """JSON-ready record of everything that changes the pixels the module sees."""
        return {**asdict(self), "size": list(self.size), "resize": RESIZE_METHOD,
                "exif_orientation": True, "range": [0, 1]}
