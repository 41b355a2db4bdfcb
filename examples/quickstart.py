"""imvec quickstart: TF checkpoint -> safetensors -> TF-Hub style module -> feature vectors.

With no internet, real ImageNet weights cannot be fetched here, so this runs on the
reference checkpoint in tests/fixtures/nasnet_mobile_small: the ORIGINAL TF-Slim NASNet-A
mobile code reduced to 3 cells / 12 filters, with deterministic RANDOM weights (the
features are therefore meaningless as image descriptors, but exactly TensorFlow's).
With real weights, replace the checkpoint by nasnet-a_mobile_04_10_2017/model.ckpt and
drop the two --hparam overrides.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

import imvec
from imvec.weights.convert import convert_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "nasnet_mobile_small"


def main(output: str = "nasnet_mobile_small.safetensors") -> None:
    path = convert_checkpoint(FIXTURE / "model.ckpt", "nasnet_mobile", output,
                              hparams={"num_cells": 3, "num_conv_filters": 12})
    print(f"converted the TF fixture checkpoint (random weights, reduced config) to {path}")

    module = imvec.load(path)
    height, width = imvec.get_expected_image_size(module)
    print("signatures:", module.get_signature_names())
    print("inputs:", module.get_input_info_dict())
    print("output:", module.get_output_info_dict()["default"])

    images = np.load(FIXTURE / "inputs.npy")  # [2, 224, 224, 3] float32 in [0, 1]
    features = module(images)
    expected = np.load(FIXTURE / "expected.npz")["features"]
    error = np.abs(features.numpy() - expected).max() / np.abs(expected).max()
    print(f"features {tuple(features.shape)} for {height}x{width} images; "
          f"max relative difference from TensorFlow's output: {error:.1e}")


if __name__ == "__main__":
    main(*sys.argv[1:])
