"""Shared test helpers: the reference fixtures and how to compare with them."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
# Tests never read or fill the user's caches (tests that need a cache set their own).
_SANDBOX = Path(tempfile.mkdtemp(prefix="imvec-tests-"))
os.environ.setdefault("IMVEC_HOME", str(_SANDBOX / "imvec"))
os.environ["TFHUB_CACHE_DIR"] = str(_SANDBOX / "tfhub_modules")
sys.path.insert(0, str(FIXTURES))  # seeded_weights.py, shared with the timm fixture script

# Each small TF fixture: (folder with the checkpoint, registry arch, hparams).
TF_FIXTURES = {
    "nasnet_mobile_small": ("nasnet_mobile_small", "nasnet_mobile",
                            {"num_cells": 3, "num_conv_filters": 12}),
    "mobilenet_v1_025_128": ("mobilenet_v1_025_128", "mobilenet_v1_050_160",
                             {"depth_multiplier": 0.25}),
    "mobilenet_v1_025_128_at192": ("mobilenet_v1_025_128", "mobilenet_v1_050_160",
                                   {"depth_multiplier": 0.25}),
    "nasnet_large_small": ("nasnet_large_small", "nasnet_large",
                           {"num_cells": 3, "num_conv_filters": 12}),
    "pnasnet_large_small": ("pnasnet_large_small", "pnasnet_large",
                            {"num_cells": 3, "num_conv_filters": 12}),
    "amoebanet_a_small": ("amoebanet_a_small", "amoebanet_a_n18_f448",
                          {"num_cells": 3, "reduction_size": 16}),
}
TOLERANCE = 1e-5  # max|ours - reference| / max|reference|, the fixtures' stated bar


def relative_error(ours, reference) -> float:
    ours, reference = np.asarray(ours, dtype=np.float64), np.asarray(reference, dtype=np.float64)
    assert ours.shape == reference.shape, f"shape {ours.shape} != reference {reference.shape}"
    return float(np.abs(ours - reference).max() / np.abs(reference).max())


def assert_close(name: str, ours, reference, tolerance: float = TOLERANCE) -> None:
    error = relative_error(ours, reference)
    diff = float(np.abs(np.asarray(ours) - np.asarray(reference)).max())
    assert error <= tolerance, (f"{name}: relative error {error:.3g} > {tolerance:g} "
                                f"(max abs difference {diff:.3g})")


def read_manifest(path: Path) -> dict[str, list[int]]:
    """{name: shape} of a variables.tsv (header line skipped)."""
    rows = path.read_text().splitlines()[1:]
    return {name: json.loads(shape) for name, shape, _ in (r.split("\t") for r in rows)}


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """Path of a TF fixture checkpoint converted with `imvec convert`, by fixture name."""
    from imvec.cli import main

    cache: dict[str, Path] = {}

    def get(name: str) -> Path:
        folder, arch, hparams = TF_FIXTURES[name]
        if folder not in cache:
            out = tmp_path_factory.mktemp("converted") / f"{folder}.safetensors"
            args = [str(FIXTURES / folder / "model.ckpt"), "--arch", arch, "-o", str(out)]
            for key, value in hparams.items():
                args += ["--hparam", f"{key}={value}"]
            assert main(["convert", *args]) == 0
            cache[folder] = out
        return cache[folder]

    return get
