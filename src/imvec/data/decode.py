"""Open any image as 8-bit RGB, safely: pixel limit checked from the header, EXIF applied.

Two decoders give the same pixels: OpenCV (libjpeg-turbo) decodes baseline RGB and grayscale
JPEGs, about 1.3-1.7x faster than Pillow here; Pillow decodes everything else (PNG, GIF,
WebP, TIFF, CMYK JPEG, 16-bit, palettes). Either way Pillow reads the header first, so the
pixel limit and the EXIF orientation come from the same place.
"""

from __future__ import annotations

import io
import os
import threading
import warnings

import numpy as np
from PIL import Image, ImageOps

__all__ = ["DEFAULT_MAX_PIXELS", "ImageDecodeError", "decode_rgb", "open_image", "to_rgb"]

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


# EXIF orientation tag (274) -> the array operation that shows the image upright; the same
# eight cases as PIL.ImageOps.exif_transpose.
_ORIENT = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}
_OPENCV_MODES = {"RGB", "L"}  # JPEG modes whose OpenCV decoding equals Pillow's


def _cv2():
    try:
        import cv2
    except ImportError:  # the Pillow path still decodes everything
        return None
    return cv2


def _check_pixels(image: Image.Image, max_pixels: int | None) -> None:
    width, height = image.size
    if max_pixels and width * height > max_pixels:
        raise ImageDecodeError(f"{width}x{height} = {width * height} pixels exceeds "
                               f"the limit of {max_pixels} (raise it with --max-pixels)")


_PILLOW_LIMIT = threading.Lock()


def _open_header(file: io.IOBase) -> Image.Image:
    """Pillow's lazy open (header only) without Pillow's own pixel limit, which would
    refuse first, with another message, and ignore ``max_pixels``."""
    if file.seek(0, os.SEEK_END) == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    file.seek(0)
    with _PILLOW_LIMIT, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(file)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def decode_rgb(
    source: str | os.PathLike | bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB of an image file (or its bytes), upright per EXIF.

    Same rules as :func:`open_image`: the pixel limit is checked from the header before any
    decoding, every mode becomes RGB, and failures raise :class:`ImageDecodeError`.
    """
    try:
        if isinstance(source, bytes | bytearray | memoryview):
            file = io.BytesIO(source)
        else:
            file = open(source, "rb")  # noqa: SIM115 (closed below, also on errors)
        with file, _open_header(file) as image:
            _check_pixels(image, max_pixels)
            cv2 = _cv2()
            if cv2 is not None and image.format == "JPEG" and image.mode in _OPENCV_MODES:
                orientation = image.getexif().get(274, 1)
                file.seek(0)
                data = np.frombuffer(file.read(), np.uint8)
                flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
                array = cv2.imdecode(data, flags)
                if array is not None and array.shape[:2] == image.size[::-1]:
                    array = cv2.cvtColor(array, cv2.COLOR_BGR2RGB)
                    if orientation in _ORIENT:
                        array = np.ascontiguousarray(_ORIENT[orientation](array))
                    return array
                # OpenCV refused it: let Pillow decode it or say why it cannot.
            image = ImageOps.exif_transpose(image)
            image.load()
            return np.asarray(to_rgb(image))
    except ImageDecodeError:
        raise
    except FileNotFoundError as exc:
        raise ImageDecodeError(f"file not found: {source}") from exc
    except IsADirectoryError as exc:
        raise ImageDecodeError(f"is a directory: {source}") from exc
    except PermissionError as exc:
        raise ImageDecodeError(f"permission denied: {source}") from exc
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"too many pixels ({exc})") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError(_reason(exc)) from exc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image (unknown format)"
    return f"cannot decode image: {exc}"
