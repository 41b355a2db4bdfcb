"""The one image pipeline: ``imvec extract``, ``imvec predict``, fine-tuning's evaluation
crops, ``imvec neighbors`` queries and :func:`imvec.preprocess` all feed a module these pixels.

An image goes: decode (EXIF orientation applied, any mode -> RGB, pixel limit from the
header) -> optional central crop -> bilinear resize to the module's size -> float32 in
[0, 1], exactly as a TF-Hub user's ``tf.image.central_crop`` + ``tf.image.resize`` + ``/ 255``.
A job's :class:`Preprocessing` is one value: recorded with the features, compared on resume.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

from imvec.data.decode import DEFAULT_MAX_PIXELS, decode_rgb, to_rgb
from imvec.data.resize import central_crop, resize_bilinear
from imvec.errors import InputError

if TYPE_CHECKING:
    from imvec.module import Module
    from imvec.registry import Card

__all__ = ["RESIZE_METHOD", "ImageLike", "Preprocessing", "preprocess", "to_unit_range"]

RESIZE_METHOD = "bilinear, half-pixel centers, no antialias (TF2 tf.image.resize)"
# One image: a file path, its bytes, a PIL image or a uint8 RGB array.
ImageLike = str | os.PathLike | bytes | Image.Image | np.ndarray


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
    """float32 0-255 values -> [0, 1], in place: the one scaling every command uses."""
    pixels *= np.float32(1 / 255)
    return pixels


@dataclass(frozen=True)
class Preprocessing:
    """``size`` (height, width) the module gets; ``crop``: central fraction kept first;
    ``accept_truncated``: use JPEGs with cut-short or corrupt data (gray where it is
    missing) instead of refusing them."""

    size: tuple[int, int]
    crop: float | None = None
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    accept_truncated: bool = False

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
        return self.pixels(decode_rgb(source, self.max_pixels, self.accept_truncated))

    def pixels(self, image: np.ndarray) -> np.ndarray:
        """Crop and resize decoded pixels (uint8 ``[H, W, 3]``, upright) to the module's
        input: ``[height, width, 3]`` float32 in [0, 1]."""
        if self.crop is not None:
            image = central_crop(image, self.crop)
        return to_unit_range(resize_bilinear(image, self.size))

    @classmethod
    def from_record(cls, record: dict) -> Preprocessing:
        """The preprocessing that :meth:`describe` recorded (e.g. an index's), to embed
        more images exactly as those were."""
        return cls(tuple(record["size"]), record.get("crop"),
                   record.get("max_pixels", DEFAULT_MAX_PIXELS),
                   bool(record.get("accept_truncated", False)))

    def describe(self) -> dict:
        """JSON-ready record of everything that changes the pixels the module sees."""
        record = {**asdict(self), "size": list(self.size), "resize": RESIZE_METHOD,
                  "exif_orientation": True, "range": [0, 1]}
        if not self.accept_truncated:  # recorded only when set: older outputs still resume
            del record["accept_truncated"]
        return record


def _input_size(model: Any, size: int | tuple[int, int] | None) -> tuple[int, int]:
    """(height, width) for ``model`` (a Module, Card, handle or short name) or a size."""
    if isinstance(model, (int, np.integer)) or (isinstance(model, (tuple, list))
                                                 and len(model) == 2):
        if size is not None:
            raise InputError(f"give the size once: the second argument is already a size "
                             f"({model}); drop size={size}")
        height, width = (model, model) if isinstance(model, (int, np.integer)) else model
        return int(height), int(width)
    from imvec.module import Module
    from imvec.nets.mobilenet_v1 import MIN_INPUT_SIZE
    from imvec.registry import Card, find_card

    if not isinstance(model, (Module, Card, str)):
        raise InputError(f"preprocess needs a Module, a Card, a handle or short name, or a "
                         f"size (int or (height, width)); got {type(model).__name__}")
    card = find_card(model) if isinstance(model, str) else getattr(model, "card", model)
    expected = tuple(card.input_size)
    if size is None:
        return expected
    wanted = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if wanted != expected:
        if not card.variable_input_size:
            raise InputError(f"{card.handle} takes {expected[0]}x{expected[1]} images only; "
                             f"drop size={size}")
        if min(wanted) < MIN_INPUT_SIZE:
            raise InputError(f"{card.handle} needs images of at least "
                             f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}; got size={size}")
    return int(wanted[0]), int(wanted[1])


def _pixels(image: ImageLike, preprocessing: Preprocessing) -> np.ndarray:
    if isinstance(image, (str, os.PathLike, bytes)):
        return preprocessing(image)
    if isinstance(image, Image.Image):  # upright by its EXIF orientation, as a file would be
        return preprocessing.pixels(np.asarray(to_rgb(ImageOps.exif_transpose(image))))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise InputError(f"an image array must be uint8 RGB [height, width, 3]; got "
                             f"{image.dtype} {list(image.shape)} (pass the file path, or "
                             "np.asarray(PIL.Image.open(path).convert('RGB')))")
        return preprocessing.pixels(image)
    raise InputError(f"an image is a path, bytes, a PIL image or a uint8 [H, W, 3] array; "
                     f"got {type(image).__name__}")


def preprocess(
    image: ImageLike | Sequence[ImageLike],
    model: Module | Card | str | int | tuple[int, int],
    *,
    size: int | tuple[int, int] | None = None,
    crop: float | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    accept_truncated: bool = False,
) -> np.ndarray:
    """An image as the module's input, exactly as ``imvec extract`` makes it.

    Decode (EXIF orientation applied, any mode -> RGB), optionally keep the central
    ``crop`` fraction (``tf.image.central_crop``), resize bilinearly as TF2's
    ``tf.image.resize`` does (half-pixel centers, no antialias), scale to [0, 1]. Embed
    query images this way and their vectors match an index made by ``imvec extract`` with
    the same options (``--crop``, ``--size``, ``--max-pixels``, ``--accept-truncated``).

    Args:
        image: a file path, its bytes, a PIL image (turned upright by its EXIF
            orientation) or a uint8 RGB ``[H, W, 3]`` array; or a list of these, or a uint8
            ``[N, H, W, 3]`` array, for a batch.
        model: the module to feed (an `imvec.Module`, an `imvec.Card`, a TF-Hub handle
            or short name: only its input size is used, nothing is downloaded), or the
            size itself (``224`` or ``(height, width)``).
        size: another size for a module that accepts several (MobileNet), as
            ``--size``.
        crop: central fraction kept before resizing (e.g. ``0.875``), as ``--crop``.
        max_pixels: refuse files with more pixels (read from the header), as
            ``--max-pixels``; ``None`` for no limit.
        accept_truncated: use JPEGs with cut-short data instead of refusing them.

    Returns:
        float32 ``[height, width, 3]`` in [0, 1], or ``[N, height, width, 3]`` for a batch.

    Raises:
        ImageDecodeError: a file that cannot be decoded (the message says why).
        InputError: an unusable argument.

    Example:
        >>> import imvec
        >>> module = imvec.load("mobilenet_v1_050_160")
        >>> x = imvec.preprocess("cat.jpg", module, crop=0.875)   # [160, 160, 3]
        >>> vector = module(x[None])                                # as imvec extract
    """
    pre = Preprocessing(_input_size(model, size), crop, max_pixels, accept_truncated)
    if isinstance(image, np.ndarray) and image.ndim == 4:
        return np.stack([_pixels(one, pre) for one in image])
    if isinstance(image, (list, tuple)):
        if not image:
            raise InputError("preprocess got an empty list of images")
        return np.stack([_pixels(one, pre) for one in image])
    return _pixels(image, pre)
