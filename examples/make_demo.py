"""Make a small demo collection and demo weights for `imvec extract`, offline.

Writes DIR/images/ (a few dozen JPEG/PNG images in sub-folders, plus one broken file to
show the errors report) and DIR/nasnet_mobile_small.safetensors: the reference checkpoint
of tests/fixtures/nasnet_mobile_small converted with `imvec convert`. Those are NOT
ImageNet weights: the original TF-Slim NASNet-A mobile code at a reduced size (3 cells,
12 filters) with deterministic random weights, so the vectors are exactly what TensorFlow
computes for that checkpoint but carry no semantic meaning. With internet access use
`--model nasnet_mobile` instead (real weights, downloaded and converted on first use).

    python examples/make_demo.py [DIR]     (default DIR: demo)
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image

from imvec.weights.convert import convert_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "nasnet_mobile_small"


def make_images(folder: Path, count: int = 40) -> None:
    rng = np.random.default_rng(0)
    photos = (np.load(FIXTURE / "inputs.npy")[:1] * 255).astype(np.uint8)[0]
    for i in range(count):
        kind = ("stripes", "blobs", "photo")[i % 3]
        target = folder / kind / f"{kind}_{i:03d}.{'png' if i % 5 == 0 else 'jpg'}"
        target.parent.mkdir(parents=True, exist_ok=True)
        if kind == "photo":
            image = np.roll(photos, 11 * i, axis=1)
        else:
            y, x = np.mgrid[0:240, 0:320] / 40.0
            wave = np.sin(x * (1 + i % 4)) if kind == "stripes" else np.sin(x) * np.cos(y)
            color = rng.uniform(0.2, 1.0, 3)
            image = ((wave[..., None] * 0.5 + 0.5) * color * 255).astype(np.uint8)
        Image.fromarray(image).save(target)
    (folder / "photo" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")


def main(out: str = "demo") -> None:
    folder = Path(out)
    make_images(folder / "images")
    weights = convert_checkpoint(FIXTURE / "model.ckpt", "nasnet_mobile",
                                 folder / "nasnet_mobile_small.safetensors",
                                 hparams={"num_cells": 3, "num_conv_filters": 12})
    print(f"wrote {folder / 'images'} (41 files, one of them broken on purpose) and {weights} "
          "(fixture weights: reduced NASNet-A mobile with random values, not ImageNet weights)")


if __name__ == "__main__":
    main(*sys.argv[1:])
