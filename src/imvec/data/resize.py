"""Crop and resize exactly as TF-Hub users do, so features match a TensorFlow pipeline.

``tf.image.resize(images, size)`` (TF2, bilinear, ``antialias=False``) samples with
half-pixel centers and clamps at the borders, in float32; the Inception-style
``tf.image.central_crop(image, 0.875)`` keeps a centered box whose offset is truncated to
an integer. Both are reproduced here on uint8 arrays. The resize gathers only the four
source pixels each output pixel needs, so its cost does not grow with the input size.
"""

from __future__ import annotations

import numpy as np

__all__ = ["central_crop", "resize_bilinear"]


def central_crop(image: np.ndarray, fraction: float) -> np.ndarray:
    """The centered ``fraction`` of ``image`` ([H, W, C]) as ``tf.image.central_crop``
    computes it: offset ``int((size - size * fraction) / 2)`` on each side (a view)."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"crop fraction must be in (0, 1], e.g. 0.875; got {fraction}")
    if fraction == 1.0:
        return image
    height, width = image.shape[:2]
    top = int((height - height * fraction) / 2)
    left = int((width - width * fraction) / 2)
    return image[top:height - top, left:width - left]


def _axis(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Lower and upper source indices and the float32 weight of the upper one, per output
    index, as TF's ``compute_interpolation_weights`` with ``HalfPixelScaler``."""
    scale = np.float32(in_size) / np.float32(out_size)
    centers = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(centers)
    lower = np.maximum(floor, 0).astype(np.intp)
    upper = np.minimum(np.ceil(centers), in_size - 1).astype(np.intp)
    return lower, upper, (centers - floor).astype(np.float32)


def resize_bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``[H, W, C]`` -> ``[height, width, C]`` float32, values in the input's scale.

    The arithmetic is TF's, in its order (along x on the upper and lower rows, then along
    y), so the result is bit for bit ``tf.image.resize``'s.
    """
    height, width = size
    if image.ndim != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f"expected an [H, W, C] image with H, W >= 1; got {image.shape}")
    y0, y1, wy = _axis(image.shape[0], height)
    x0, x1, wx = _axis(image.shape[1], width)
    upper, lower = y0[:, None], y1[:, None]

    def corners(rows: np.ndarray, columns: np.ndarray) -> np.ndarray:
        # Only the output's pixels: gathering whole rows first made a 1-pixel-tall image
        # W pixels wide cost height * W * 3 bytes (16 GB for a 16 KB PNG).
        return image[rows, columns[None, :]].astype(np.float32)

    wx = wx[None, :, None]
    top = corners(upper, x1)
    top_left = corners(upper, x0)
    top -= top_left
    top *= wx
    top += top_left
    bottom = corners(lower, x1)
    bottom_left = corners(lower, x0)
    bottom -= bottom_left
    bottom *= wx
    bottom += bottom_left
    bottom -= top
    bottom *= wy[:, None, None]
    bottom += top
    return bottom
