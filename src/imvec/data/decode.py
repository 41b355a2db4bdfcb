"""Open any image as 8-bit RGB, safely: pixel limit checked from the header, EXIF applied."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

__all__ = ["DEFAULT_MAX_PIXELS", "ImageDecodeError", "open_image", "to_rgb"]

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit


class ImageDecodeError(ValueError):
    """An image that cannot be used; the message is the reason written to error reports."""


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: grayscale, palette, CMYK, alpha (dropped), 16-bit, float."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / scale * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(array, "L").convert("RGB")
    if image.mode in ("PA", "LA") or (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGBA").convert("RGB")  # alpha is dropped, as TF's decoders do
    return image.convert("RGB")


def open_image(
    path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """Decode ``path`` to an RGB PIL image with its EXIF orientation applied.

    Images larger than ``max_pixels`` are refused from the header, before any decoding.
    Raises :class:`ImageDecodeError` with a one-line reason for anything unusable.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            if max_pixels and width * height > max_pixels:
                raise ImageDecodeError(f"{width}x{height} = {width * height} pixels exceeds "
                                       f"the limit of {max_pixels} (raise it with --max-pixels)")
            image = ImageOps.exif_transpose(image)
            image.load()
            return to_rgb(image)
    except ImageDecodeError:
        raise
    except FileNotFoundError as exc:
        raise ImageDecodeError(f"file not found: {path}") from exc
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"too many pixels ({exc})") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageDecodeError(f"cannot decode image: {exc}") from exc
