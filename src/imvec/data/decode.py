"""Open any image as 8-bit RGB, safely: pixel limit checked from the header, EXIF applied.

Two decoders give the same pixels: OpenCV (libjpeg-turbo) decodes baseline RGB and grayscale
JPEGs, about 1.3-1.7x faster than Pillow here; Pillow decodes everything else (PNG, GIF,
WebP, TIFF, CMYK JPEG, 16-bit, palettes). Either way Pillow reads the header first, so the
pixel limit and the EXIF orientation come from the same place.

Safety: only regular files are opened (a FIFO would block ``open()`` forever, a device could
be endless); memory is a few bytes per pixel whatever the mode (no full-size 16-bit, float
or duplicate copies); a JPEG whose compressed data is cut short or corrupt, which libjpeg
fills with gray and only warns about, is refused unless ``accept_truncated``.
"""

from __future__ import annotations

import contextlib
import io
import os
import stat
import sys
import threading
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageFile

__all__ = ["DEFAULT_DECODE_TIMEOUT", "DEFAULT_MAX_PIXELS", "ImageDecodeError", "decode_rgb",
           "open_image", "to_rgb"]

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own decompression-bomb limit
# Seconds one image may take in a decoding worker (see imvec.extract.pool); photos take
# well under one, a hostile or broken file could take forever.
DEFAULT_DECODE_TIMEOUT = 60.0
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L")
_GRAY_MODES = ("L", "I", "F", *_SIXTEEN_BIT)
_BAND_PIXELS = 1 << 20  # grayscale rows are converted this many pixels at a time


class ImageDecodeError(ValueError):
    """An image that cannot be used; the message is the reason written to error reports."""


def _gray_bands(image: Image.Image) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, uint8 rows) of a grayscale image, a band at a time, so that no
    full-size 16-bit or float copy ever exists (a 16-bit PNG took 28 bytes per pixel).

    16-bit samples keep their high byte, ``v >> 8``: what ``tf.io.decode_png(...,
    dtype=tf.uint8)`` returns (TF's png_io.cc calls libpng's ``png_set_strip_16``), and what
    Pillow itself does to 16-bit RGB(A) PNGs. 32-bit ``I``/``F`` images (TIFF; TF decodes
    none) scale by 65535 when they exceed 255, else by 255, with rounding."""
    width, height = image.size
    scale = 255.0
    if image.mode in ("I", "F") and image.getextrema()[1] > 255:
        scale = 65535.0
    step = max(1, _BAND_PIXELS // max(width, 1))
    for top in range(0, height, step):
        band = np.asarray(image.crop((0, top, width, min(top + step, height))))
        if image.mode in _SIXTEEN_BIT:
            band = (band >> 8).astype(np.uint8)
        elif image.mode in ("I", "F"):
            band = np.clip(band.astype(np.float64) / scale * 255.0 + 0.5, 0, 255)
            band = band.astype(np.uint8)
        yield top, band


def _rgb_array(image: Image.Image) -> np.ndarray:
    """``[H, W, 3]`` uint8 of a loaded image, filled a band of rows at a time: besides
    Pillow's own image, only the result is full-size (a whole-image ``np.asarray`` or
    ``convert`` made two or three more copies)."""
    width, height = image.size
    out = np.empty((height, width, 3), np.uint8)
    if image.mode in _GRAY_MODES:
        for top, band in _gray_bands(image):
            out[top:top + len(band)] = band[..., None]
        return out
    step = max(1, _BAND_PIXELS // max(width, 1))
    for top in range(0, height, step):
        band = image.crop((0, top, width, min(top + step, height)))
        if image.mode in ("PA", "LA") or (image.mode == "P" and "transparency" in image.info):
            band = band.convert("RGBA")  # alpha is dropped, as TF's decoders do
        out[top:top + band.size[1]] = np.asarray(band.convert("RGB"))
    return out


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any mode: grayscale, palette, CMYK, alpha (dropped), 16-bit, float."""
    if image.mode == "RGB":
        return image
    if image.mode in _GRAY_MODES and image.mode != "L":
        gray = np.empty((image.size[1], image.size[0]), np.uint8)
        for top, band in _gray_bands(image):
            gray[top:top + len(band)] = band
        return Image.fromarray(gray, "L").convert("RGB")
    return Image.fromarray(_rgb_array(image), "RGB")


def open_image(
    path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS,
    accept_truncated: bool = False,
) -> Image.Image:
    """Decode ``path`` to an RGB PIL image with its EXIF orientation applied.

    The same decoding, checks and errors as :func:`decode_rgb`.
    """
    return Image.fromarray(decode_rgb(path, max_pixels, accept_truncated), "RGB")


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


def _upright(array: np.ndarray, orientation: int) -> np.ndarray:
    if orientation in _ORIENT:
        return np.ascontiguousarray(_ORIENT[orientation](array))
    return array


def opencv():
    """OpenCV, or None where it is not installed (Pillow then decodes everything)."""
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


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _open_regular(path: str | os.PathLike) -> io.BufferedReader:
    """``path`` opened for reading, refused unless it is a regular file: opening a FIFO
    blocks until a writer comes, and reading a device may never end. The type is checked
    before opening, and again on the open file (O_NONBLOCK: a FIFO swapped in between
    cannot block the open either)."""
    if not stat.S_ISREG(mode := os.stat(path).st_mode):
        raise ImageDecodeError(f"{_kind(mode)}, not an image file: {os.fsdecode(path)}")
    nonblocking = getattr(os, "O_NONBLOCK", 0)
    fd = os.open(path, os.O_RDONLY | nonblocking | getattr(os, "O_BINARY", 0))
    try:
        if not stat.S_ISREG(mode := os.fstat(fd).st_mode):
            raise ImageDecodeError(f"{_kind(mode)}, not an image file: {os.fsdecode(path)}")
        if nonblocking:
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# libjpeg reports damaged entropy data only as warnings printed to stderr, then fills the
# missing blocks with gray. Extraneous bytes and a bad ICC marker leave every pixel intact.
_DAMAGE = ("Corrupt JPEG data", "Premature end of JPEG file", "Invalid SOS parameters",
           "Inconsistent progression sequence")
_HARMLESS = ("extraneous bytes before marker", "bad ICC marker")
_STDERR = threading.Lock()  # file descriptor 2 is the whole process's
_SCRATCH: dict[int, int] = {}  # process id -> file that takes fd 2 while a JPEG decodes


def _scratch_file() -> int:
    pid = os.getpid()  # a forked worker must not share its parent's file and offset
    if pid not in _SCRATCH:
        if hasattr(os, "memfd_create"):
            _SCRATCH[pid] = os.memfd_create("imvec-decoder-messages")
        else:
            import tempfile

            handle, name = tempfile.mkstemp(prefix="imvec-decoder-")
            os.unlink(name)
            _SCRATCH[pid] = handle
    return _SCRATCH[pid]


@contextlib.contextmanager
def _decoder_warnings() -> Iterator[list[str]]:
    """Collects the JPEG damage warnings the C decoder prints while the block runs; any
    other text printed to stderr meanwhile is passed on."""
    found: list[str] = []
    with _STDERR:
        scratch = _scratch_file()
        os.ftruncate(scratch, 0)
        os.lseek(scratch, 0, os.SEEK_SET)
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(scratch, 2)
        try:
            yield found
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            text = os.pread(scratch, 1 << 16, 0).decode("utf-8", "replace")
            others = []
            for line in text.splitlines():
                damage = line.startswith(_DAMAGE) and not any(h in line for h in _HARMLESS)
                (found if damage else others).append(line)
            if others:
                os.write(2, ("\n".join(others) + "\n").encode())


def _refuse_damage(found: list[str], accept_truncated: bool) -> None:
    if found and not accept_truncated:
        raise ImageDecodeError(f"damaged JPEG data, decoded partly gray ({found[0]}); "
                               "pass --accept-truncated to use such images anyway")


def _decode_jpeg(cv2, file: io.IOBase, image: Image.Image, accept_truncated: bool
                 ) -> np.ndarray | None:
    """OpenCV's RGB decoding of a JPEG Pillow would decode alike; None if OpenCV refuses.
    A JPEG Pillow must decode (CMYK, ...) is only checked here: OpenCV reads its data at
    1/8 scale, which still walks all of it, to hear libjpeg's warnings."""
    file.seek(0)
    data = np.frombuffer(file.read(), np.uint8)
    if image.mode not in _OPENCV_MODES:
        with _decoder_warnings() as found:
            cv2.imdecode(data, cv2.IMREAD_REDUCED_GRAYSCALE_8)
        _refuse_damage(found, accept_truncated)
        return None
    rgb = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.11 decodes straight to RGB
    flags = (cv2.IMREAD_COLOR if rgb is None else rgb) | cv2.IMREAD_IGNORE_ORIENTATION
    with _decoder_warnings() as found:
        array = cv2.imdecode(data, flags)
    del data
    if array is None or array.shape[:2] != image.size[::-1]:
        return None  # let Pillow decode it or say why it cannot
    _refuse_damage(found, accept_truncated)
    if rgb is None:
        cv2.cvtColor(array, cv2.COLOR_BGR2RGB, dst=array)  # in place: no second copy
    return _upright(array, image.getexif().get(274, 1))


def _load(image: Image.Image, file: io.IOBase, accept_truncated: bool) -> Image.Image:
    """``image`` loaded; a file that ends early is refused unless ``accept_truncated``."""
    try:
        image.load()
        return image
    except OSError as exc:
        if not (accept_truncated and "truncated" in str(exc)):
            raise
    # Pillow's switch is global: flip it only for this (rare) retry, under the lock.
    with _PILLOW_LIMIT:
        saved, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, True
        saved_limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            file.seek(0)
            retry = Image.open(file)
            retry.load()
            return retry
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = saved, saved_limit


def decode_rgb(
    source: str | os.PathLike | bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS,
    accept_truncated: bool = False,
) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB of an image file (or its bytes), upright per EXIF.

    The pixel limit is checked from the header before any decoding; every mode becomes RGB
    (16-bit keeps the high byte, as TF's ``decode_png(dtype=uint8)``); only regular files
    are opened; a JPEG with cut-short or corrupt data is refused unless
    ``accept_truncated``. Failures raise :class:`ImageDecodeError` with a one-line reason.
    """
    try:
        if isinstance(source, bytes | bytearray | memoryview):
            file = io.BytesIO(source)
        else:
            file = _open_regular(source)
        with file, _open_header(file) as image:
            _check_pixels(image, max_pixels)
            cv2 = opencv()
            if cv2 is not None and image.format == "JPEG":
                array = _decode_jpeg(cv2, file, image, accept_truncated)
                if array is not None:
                    return array
            with _load(image, file, accept_truncated) as loaded:
                orientation = loaded.getexif().get(274, 1)
                return _upright(_rgb_array(loaded), orientation)
    except ImageDecodeError:
        raise
    except FileNotFoundError as exc:
        raise ImageDecodeError(f"file not found: {os.fsdecode(source)}") from exc
    except IsADirectoryError as exc:
        raise ImageDecodeError(f"is a directory: {os.fsdecode(source)}") from exc
    except PermissionError as exc:
        raise ImageDecodeError(f"permission denied: {os.fsdecode(source)}") from exc
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"too many pixels ({exc})") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError(_reason(exc)) from exc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image (unknown format)"
    if "truncated" in str(exc):
        return f"cannot decode image: {exc}; pass --accept-truncated to use what decodes"
    return f"cannot decode image: {exc}"
