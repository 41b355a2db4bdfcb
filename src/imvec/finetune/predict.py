"""Top-k labels for images, from a fine-tuned run or a TF-Hub classification module.

Images get the evaluation preprocessing of fine-tuning (central 87.5% crop, resized to
the size the classifier was trained at, or the module's size): the pixels of
``imvec extract --crop 0.875`` and :func:`imvec.preprocess` (one pipeline, :mod:`imvec.data`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from imvec.data.decode import ImageDecodeError
from imvec.data.preprocess import Preprocessing
from imvec.finetune.data import EVAL_CENTRAL_FRACTION
from imvec.finetune.rundir import MODEL
from imvec.labels import top_k
from imvec.loader import load
from imvec.module import Module
from imvec.registry import find_card
from imvec.weights.convert import read_metadata

__all__ = ["Prediction", "load_classifier", "predict"]


@dataclass(frozen=True)
class Prediction:
    """The top labels of one image with their probabilities, or why there are none."""

    path: str
    labels: tuple[tuple[str, float], ...] = ()
    error: str | None = None


def load_classifier(model: str | os.PathLike, engine: str | None = None
                    ) -> tuple[Module, tuple[int, int]]:
    """A classification module and the image size to feed it, from a run directory, a
    ``.safetensors`` with logits, or a TF-Hub handle / short name (its classification
    twin); ``engine``: the inference engine, as :func:`imvec.load` takes it."""
    path = Path(model)
    if path.is_dir():
        path = path / MODEL
        if not path.is_file():
            raise FileNotFoundError(f"{model} holds no {MODEL}: the run has not finished "
                                    "(continue it with `imvec finetune ... --resume`)")
    if path.suffix == ".safetensors":
        metadata = read_metadata(path)
        if not metadata.get("num_classes"):
            raise ValueError(f"{path} is a feature-vector file without logits; predict needs a "
                             "classifier (a fine-tuned run or a classification checkpoint)")
        module = load(path, variant="classification", engine=engine)
        size = tuple(json.loads(metadata["image_size"])) if metadata.get("image_size") else None
        return module, size or module.card.input_size
    card = find_card(str(model))
    if card.variant != "classification":
        if card.alias != str(model):
            raise ValueError(f"{card.handle} is a feature-vector module; predict needs "
                             f"{card.handle.replace('/feature_vector/', '/classification/')} "
                             "or a fine-tuned run")
        card = find_card(str(model), "classification")
    module = load(card.handle, engine=engine)
    return module, module.card.input_size


@torch.no_grad()
def predict(
    images: Sequence[str | os.PathLike],
    model: str | os.PathLike | Module,
    k: int = 5,
    *,
    batch_size: int = 32,
    central_fraction: float = EVAL_CENTRAL_FRACTION,
    image_size: tuple[int, int] | None = None,
    engine: str = "auto",
) -> list[Prediction]:
    """Top-``k`` (label, probability) per image, in order; an image that cannot be
    decoded gets an ``error`` instead, and the others are still classified. ``engine``:
    the inference engine a model loaded here runs (a Module passed keeps its own; asking
    it for another is an error)."""
    if isinstance(model, Module):
        if engine not in ("auto", model.engine):
            raise ValueError(f"the module passed runs the {model.engine!r} engine, not "
                             f"{engine!r}; load it with imvec.load(..., engine={engine!r}) or "
                             "leave engine unset")
        module, size = model, image_size or model.card.input_size
    else:
        module, size = load_classifier(model, engine)
        size = image_size or size
    names = module.class_names
    preprocessing = Preprocessing(tuple(size), central_fraction)
    results: list[Prediction] = []
    for start in range(0, len(images), batch_size):
        batch, ok = [], []
        for path in images[start:start + batch_size]:
            try:
                batch.append(preprocessing(path))
            except ImageDecodeError as exc:
                results.append(Prediction(str(path), error=str(exc)))
                continue
            ok.append((len(results), str(path)))
            results.append(Prediction(str(path)))
        if batch:
            logits = module(np.stack(batch))
            for (slot, path), top in zip(ok, top_k(logits, k, names), strict=True):
                results[slot] = Prediction(path, tuple(top))
    return results
