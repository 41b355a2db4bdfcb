"""Where features came from: the model, its weights' sha256 and the preprocessing.

This record goes into the output's metadata and into the work folder of an unfinished run;
a resumed run must produce the same record, or it would mix incompatible vectors.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from imvec._version import __version__
from imvec.data.preprocess import Preprocessing
from imvec.engines.graph import ENV_ENGINE, check_precision
from imvec.errors import InputError
from imvec.extract.job import DEFAULT_ENGINE
from imvec.loader import load
from imvec.module import Module, get_expected_image_size
from imvec.nets.mobilenet_v1 import MIN_INPUT_SIZE

__all__ = ["FEATURES_FORMAT", "describe", "differences", "load_module", "preprocessing_for",
           "source_sha256", "weights_sha256"]

FEATURES_FORMAT = "imvec-features/1"
# What weights_sha256 digests; records without it hashed the file or copied its source's sha.
WEIGHTS_IDENTITY = "tensors/1"
# Keys whose change makes old and new vectors incomparable (the model's file path may move).
# The inference engine is not among them, nor recorded: engines give the same vectors to
# float32 rounding, so a resume may use another one.
_COMPARED = ("handle", "network", "hparams", "variant", "num_features", "weights_sha256",
             "precision")


def load_module(model: Any, precision: str | None = None, engine: str | None = None
                ) -> Module:
    """A module loaded by name or path runs ``engine`` (as :func:`imvec.load` takes it),
    by default :data:`~imvec.extract.job.DEFAULT_ENGINE` unless ``$IMVEC_ENGINE`` names
    one. A Module passed in keeps its engine and precision: asking for others is an error."""
    if isinstance(model, Module):
        if precision is not None and check_precision(precision) != model.precision:
            raise ValueError(f"the module passed runs in {model.precision}, not {precision}; "
                             f"load it with imvec.load(..., precision={precision!r}) or leave "
                             "precision unset")
        if engine not in (None, "auto", model.engine):
            raise ValueError(f"the module passed runs the {model.engine!r} engine, not "
                             f"{engine!r}; load it with imvec.load(..., engine={engine!r}) or "
                             "leave engine unset")
        return model
    if engine is None and not os.environ.get(ENV_ENGINE):
        engine = DEFAULT_ENGINE
    return load(model, engine=engine, precision=precision)


def weights_sha256(module: Module) -> str:
    """sha256 of the tensors the module computes with: every parameter and buffer by sorted
    name (name, dtype, shape, then the raw bytes), so EMA vs raw conversions of one
    checkpoint, a module changed in memory and a fine-tuned file all differ. Computed, never
    read from a file's metadata (0.1 s for NASNet-A mobile, 0.7 s for large, here)."""
    digest = hashlib.sha256(b"imvec-tensors/1")
    for name, tensor in sorted(module.net.state_dict().items()):
        if name.endswith("num_batches_tracked"):
            continue  # a training counter: no influence on any output
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}\0{flat.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def source_sha256(module: Module) -> str | None:
    """What the weights were converted from, as the file says (informational only)."""
    source = Path(str(module.source))
    if source.suffix == ".safetensors" and source.is_file():
        from imvec.weights.convert import read_metadata

        return read_metadata(source).get("source_sha256") or None
    return None


def preprocessing_for(module: Module, size: int | None, crop: float | None,
                      max_pixels: int | None, accept_truncated: bool = False) -> Preprocessing:
    """The module's own input size, or ``size`` for a variable-size module."""
    expected = get_expected_image_size(module)
    if size is not None and (size, size) != tuple(expected):
        if not module.card.variable_input_size:
            raise InputError(f"{module.card.handle} takes {expected[0]}x{expected[1]} images "
                             f"only; drop --size {size}")
        if size < MIN_INPUT_SIZE:
            raise InputError(f"{module.card.handle} needs images of at least "
                             f"{MIN_INPUT_SIZE}x{MIN_INPUT_SIZE}; got --size {size}")
        expected = (size, size)
    return Preprocessing(tuple(expected), crop, max_pixels, accept_truncated)


def describe(module: Module, preprocessing: Preprocessing, output_format: str) -> dict:
    """The JSON-ready provenance record."""
    card = module.card
    return {
        "format": FEATURES_FORMAT,
        "output_format": output_format,
        "model": {
            "handle": card.handle,
            "source": str(module.source),
            "network": card.network,
            "hparams": json.loads(json.dumps(module.hparams, sort_keys=True)),
            "variant": card.variant,
            "num_features": int(module.num_features) if card.variant == "feature_vector"
            else int(card.num_classes or 0),
            "weights_sha256": weights_sha256(module),
            "weights_identity": WEIGHTS_IDENTITY,
            "source_sha256": source_sha256(module),
            "precision": module.precision,
        },
        "preprocessing": preprocessing.describe(),
        "imvec_version": __version__,
    }


def differences(old: dict, new: dict) -> list[str]:
    """Human-readable reasons why vectors made under ``old`` cannot join those of ``new``."""
    reasons = []
    if old.get("model", {}).get("weights_identity") != new["model"].get("weights_identity"):
        return ["it was made by an older imvec that recorded the weights file's sha256, not "
                "that of the tensors used, so the weights cannot be checked"]
    for key in _COMPARED:
        # records written before precision was recorded were float32
        a = old.get("model", {}).get(key, "float32" if key == "precision" else None)
        b = new["model"].get(key)
        if a != b:
            reasons.append(f"model {key} was {a!r}, now {b!r}")
    old_pre, new_pre = old.get("preprocessing", {}), new["preprocessing"]
    for key in sorted(set(old_pre) | set(new_pre)):
        if old_pre.get(key) != new_pre.get(key):
            reasons.append(f"preprocessing {key} was {old_pre.get(key)!r}, "
                           f"now {new_pre.get(key)!r}")
    if old.get("output_format") != new["output_format"]:
        reasons.append(f"output format was {old.get('output_format')!r}, "
                       f"now {new['output_format']!r}")
    if old.get("format") != new["format"]:
        reasons.append(f"record format was {old.get('format')!r}, now {new['format']!r}")
    return reasons
