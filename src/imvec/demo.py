"""A small demo collection and demo weights for ``imvec extract``, offline, from an install.

``imvec demo DIR`` (or ``python -m imvec.demo DIR``) writes DIR/images/ (40 JPEG/PNG images
in three sub-folders, plus one broken file to show the errors report) and
DIR/nasnet_mobile_small.safetensors. Those weights are NOT ImageNet weights: they are the
test fixture ``nasnet_mobile_small`` (the TF-Slim NASNet-A mobile code at a reduced size,
3 cells and 12 filters, with seeded random values), derived here value for value from the
fixtures' documented generator, so the vectors are exactly what TensorFlow computes for
that checkpoint but carry no meaning. With internet access use ``--model nasnet_mobile``
instead (real weights, downloaded and converted on first use).
"""

from __future__ import annotations

import hashlib
import math
import os
import sys
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["DEMO_HPARAMS", "DEMO_NOTE", "demo_tensors", "demo_weights", "make_demo",
           "make_images"]

DEMO_HPARAMS = {"num_cells": 3, "num_conv_filters": 12}
DEMO_NOTE = ("imvec demo weights, made from the test fixtures (nasnet_mobile_small: reduced "
             "NASNet-A mobile, 3 cells, 12 filters, seeded random values), not real ImageNet "
             "weights")
WEIGHTS_NAME = "nasnet_mobile_small.safetensors"
_SEED_OFFSET = 777001  # the fixtures' generator (tests/fixtures/*/README.txt)


def _seeded(name: str, shape: tuple[int, ...]) -> np.ndarray:
    """The fixtures' value of TF variable ``name``: its own RandomState, seeded from the
    CRC-32 of the name, so values do not depend on the order variables are made."""
    rng = np.random.RandomState((zlib.crc32(name.encode()) + _SEED_OFFSET) % 2**32)
    leaf = name.rsplit("/", 1)[-1]
    if leaf in ("weights", "depthwise_weights", "pointwise_weights"):
        fan_in = shape[0] if len(shape) == 2 else (
            shape[0] * shape[1] * (1 if leaf == "depthwise_weights" else shape[2]))
        value = rng.normal(0.0, 1.0 / math.sqrt(fan_in), shape)
    elif leaf == "biases":
        value = rng.normal(0.0, 0.01, shape)
    elif leaf in ("gamma", "moving_variance"):
        value = rng.uniform(0.5, 1.5, shape)
    else:  # beta, moving_mean
        value = rng.normal(0.0, 0.1, shape)
    return np.asarray(value, dtype=np.float32)


def demo_tensors() -> dict[str, np.ndarray]:
    """``{TF variable name: float32 value}`` of the demo network, logits included."""
    import torch

    from imvec.registry import build_network, find_card
    from imvec.weights.mapping import tf_bindings, to_tf_layout

    card = find_card("nasnet_mobile")
    with torch.device("meta"):  # names and shapes only
        net = build_network(card.network, num_classes=1001, **{**card.hparams, **DEMO_HPARAMS})
    state = net.state_dict()
    return {name: _seeded(name, tuple(to_tf_layout(state[b.param], b.layout).shape))
            for name, b in sorted(tf_bindings(net).items())}


def demo_weights(output: str | os.PathLike) -> Path:
    """Write the demo weights as an ``imvec convert`` file (its ``source`` metadata says
    what they are); returns the path."""
    from imvec.weights.convert import convert_tensors

    tensors = demo_tensors()
    digest = hashlib.sha256()
    for name, value in tensors.items():
        digest.update(name.encode())
        digest.update(value.tobytes())
    return convert_tensors(tensors, "nasnet_mobile", output, DEMO_HPARAMS, source=DEMO_NOTE,
                           source_sha256=digest.hexdigest())


def _photo(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth colour ramps with a little noise: photo-like, and kind to JPEG."""
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    phase = rng.uniform(0, 6, 3)
    image = np.stack([np.sin(x * (3 + c) + phase[c]) * np.cos(y * (2 + c)) for c in range(3)],
                     -1) * 100 + 128
    return np.clip(image + rng.normal(0, 4, image.shape), 0, 255).astype(np.uint8)


def make_images(folder: str | os.PathLike, count: int = 40) -> Path:
    """``count`` images (stripes, blobs, photo-like; every fifth a PNG) in sub-folders, and
    ``photo/broken.jpg``, which is not an image."""
    from PIL import Image

    folder = Path(folder)
    rng = np.random.default_rng(0)
    photo = _photo(240, 320, rng)
    for i in range(count):
        kind = ("stripes", "blobs", "photo")[i % 3]
        target = folder / kind / f"{kind}_{i:03d}.{'png' if i % 5 == 0 else 'jpg'}"
        target.parent.mkdir(parents=True, exist_ok=True)
        if kind == "photo":
            image = np.roll(photo, 11 * i, axis=1)
        else:
            y, x = np.mgrid[0:240, 0:320] / 40.0
            wave = np.sin(x * (1 + i % 4)) if kind == "stripes" else np.sin(x) * np.cos(y)
            color = rng.uniform(0.2, 1.0, 3)
            image = ((wave[..., None] * 0.5 + 0.5) * color * 255).astype(np.uint8)
        Image.fromarray(image).save(target)
    (folder / "photo").mkdir(parents=True, exist_ok=True)
    (folder / "photo" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


def make_demo(folder: str | os.PathLike = "demo") -> tuple[Path, Path]:
    """DIR/images/ and DIR/nasnet_mobile_small.safetensors; returns both paths."""
    folder = Path(folder)
    return make_images(folder / "images"), demo_weights(folder / WEIGHTS_NAME)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) > 1 or any(a.startswith("-") for a in args):
        print("usage: python -m imvec.demo [DIR]   (default DIR: demo)", file=sys.stderr)
        return 2
    images, weights = make_demo(*args)
    print(f"wrote {images} (41 files, one of them broken on purpose) and {weights} "
          "(demo weights made from the test fixtures, not ImageNet weights); next:\n"
          f"  imvec extract {images} --model {weights} -o {images.parent / 'features.parquet'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
