"""A small synthetic image-folder dataset, for trying fine-tuning offline and for tests.

Each class has a hue; every image is blotchy noise tinted with that hue under a few shapes
of that hue at random brightness, size and place, so a classifier must look at colour,
not at positions or single pixels.
"""

from __future__ import annotations

import colorsys
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["TOY_CLASSES", "make_toy_dataset"]

TOY_CLASSES = {"red": 0.0, "green": 1 / 3, "blue": 2 / 3}  # class name -> hue


def make_toy_dataset(
    root: str | os.PathLike,
    per_class: int = 20,
    size: int = 96,
    seed: int = 0,
    classes: dict[str, float] | None = None,
) -> Path:
    """Write ``root/<class>/<class>_<i>.png`` and return ``root``."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for name, hue in (classes or TOY_CLASSES).items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            _image(rng, hue, size).save(folder / f"{name}_{i:03d}.png")
    return root


def _image(rng: np.random.Generator, hue: float, size: int) -> Image.Image:
    """Blotchy noise tinted with the class hue, under shapes of that hue."""
    noise = rng.uniform(0.2, 0.8, (size // 8, size // 8, 1))
    tint = np.array(colorsys.hsv_to_rgb(hue, 1.0, rng.uniform(0.5, 1.0)))
    background = (0.6 * noise + 0.4 * tint) * 255
    image = Image.fromarray(background.astype(np.uint8)).resize((size, size), Image.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 6))):
        h = (hue + rng.uniform(-0.05, 0.05)) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, rng.uniform(0.6, 1.0), rng.uniform(0.5, 1.0))
        x0, y0 = rng.integers(0, size * 3 // 4, 2)
        w, h2 = rng.integers(size // 6, size // 2, 2)
        box = [int(x0), int(y0), int(x0 + w), int(y0 + h2)]
        fill = (int(r * 255), int(g * 255), int(b * 255))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    return image
