"""Shared by the extraction tests: sample images and independent reference features."""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).parents[1] / "data"))

from sample_images import every_kind, pattern, save  # noqa: E402

__all__ = ["BAD", "GOOD", "RAY_TOKEN", "every_kind", "make_folder", "pattern", "random_mobilenet",
           "reference_pixels", "reference_features", "save"]

GOOD = ["alpha.png", "cmyk.jpg", "gray.jpg", "palette.gif", "rgb.jpg", "rotated.jpg",
        "sixteen.png"]
BAD = {"empty.jpg": "empty file", "huge.png": "exceeds the limit", "text.jpg": "not an image",
       "truncated.jpg": "truncated"}

# One token per test process: Ray (>= 2.59, token auth on) reads it once per process, so a
# second local Ray started with another token was refused ("InvalidAuthToken"). Set in the
# environment, it also keeps Ray from writing ~/.ray/auth_token.
RAY_TOKEN = secrets.token_hex(32)


def make_folder(root: Path, count: int, size: int = 64, seed: int = 0) -> Path:
    """``count`` photo-like JPEGs in two levels of folders."""
    for i in range(count):
        sub = root / f"group{i % 3}"
        save(pattern(size, size, seed=seed + i), sub / f"img{i:04d}.jpg", quality=92)
    return root


def reference_pixels(path: Path) -> np.ndarray:
    """Upright RGB uint8 straight from Pillow, 16-bit scaled with rounding: no imvec code."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode.startswith("I;16"):
            array = np.floor(np.asarray(image, np.float64) / 65535 * 255 + 0.5).astype(np.uint8)
            return np.repeat(array[..., None], 3, axis=2)
        return np.asarray(image.convert("RGB"))


def reference_features(module, path: Path, size: int) -> np.ndarray:
    """The module on the image halved by 2x2 block means (what a half-pixel-centers
    bilinear resize to half size is), in [0, 1]: independent of imvec.data."""
    pixels = reference_pixels(path).astype(np.float64)
    h, w = pixels.shape[:2]
    assert (h, w) == (2 * size, 2 * size), "reference images must be twice the model size"
    halved = pixels.reshape(size, 2, size, 2, 3).mean(axis=(1, 3)) / 255
    with torch.inference_mode():
        return module(halved[None].astype(np.float32)).numpy()[0]


def random_mobilenet(path: Path, seed: int = 0) -> Path:
    """MobileNet V1 (depth 0.25) with He-initialised random convolutions, saved as an
    ``imvec convert`` file. Its features differ clearly from image to image (the reduced
    TF fixtures give nearly the same vector for every image, which would let a test pass
    on the wrong pixels)."""
    import json

    import imvec
    from imvec.weights.convert import FORMAT, save_converted

    hparams = {"depth_multiplier": 0.25}
    net = imvec.create_model("mobilenet_v1_050_160", **hparams)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in net.parameters():
            if parameter.dim() == 4:
                fan_in = parameter[0].numel()
                parameter.copy_(torch.randn(parameter.shape, generator=generator)
                                * (2.0 / fan_in) ** 0.5)
    metadata = {"format": FORMAT, "arch": "mobilenet_v1_050_160", "network": "mobilenet_v1",
                "hparams": json.dumps(hparams), "num_classes": "", "source": "random (tests)"}
    return save_converted(net, path, metadata)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random MobileNet weights, offline (a fixture: import it into a test module)."""
    return random_mobilenet(tmp_path_factory.mktemp("weights") / "random.safetensors")


@pytest.fixture(scope="module")
def module(weights):
    import imvec

    return imvec.load(weights)
