"""``imvec.load`` and ``imvec.create_model``: from a handle or a file to a network."""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from imvec.errors import ImvecError
from imvec.module import Module
from imvec.registry import build_network, find_card
from imvec.weights import sources, store
from imvec.weights.convert import class_names, load_converted, read_metadata

__all__ = ["VARIANTS", "create_model", "load", "weights_home"]

VARIANTS = ("feature_vector", "classification")
# metadata a converted file must hold, and those that are JSON text
_REQUIRED_METADATA = ("arch", "hparams")
_JSON_METADATA = ("hparams", "class_names", "image_size", "finetune")


def weights_home() -> Path:
    """``$IMVEC_HOME`` (default ``~/.cache/imvec``)."""
    return store.home()


def load(
    handle_or_path: str | os.PathLike,
    *,
    trainable: bool = False,
    tags: set[str] | None = None,
    variant: str | None = None,
    pretrained: bool = True,
    batch_norm_momentum: float | None = None,
    arch: str | None = None,
    engine: str | None = None,
    precision: str | None = None,
    prefer_ema: bool = False,
) -> Module:
    """A TF-Hub image module from a handle, its tfhub.dev URL, a short name, a
    ``.safetensors`` file written by ``imvec convert``, or any other SOURCE that
    ``imvec convert`` accepts (http(s) URL, ``.tar.gz``, hub module or checkpoint
    directory, checkpoint prefix; ``arch`` names the network where the source does not).

    Registry weights are downloaded from the card's sources, verified and converted into
    ``$IMVEC_HOME/weights`` on first use, then loaded from there (memory-mapped); other
    sources are converted into the cache once too. ``IMVEC_OFFLINE=1`` never downloads.

    ``variant`` ("feature_vector" or "classification") picks the twin where the source
    does not say (a short name or a file); the default is "feature_vector", except for a
    classifier written by ``imvec finetune``, which opens with its logits and class names.
    ``pretrained=False`` builds the network with random weights, offline.
    ``prefer_ema=True`` converts a TF-Slim checkpoint's moving averages instead of its raw
    values (the default, which the TF-Hub modules hold; docs/weights.md).

    ``engine`` picks how a ``trainable=False`` module runs (see :mod:`imvec.engines`):
    "auto" (the default: "onnxruntime" where installed, else "fast"; ``$IMVEC_ENGINE``
    overrides it), "fast" (BN folded, fused, channels_last), "compile", "onnxruntime" or
    "faithful"; ``variable_map`` always shows the original, unfolded variables.
    ``precision="bfloat16"`` runs the fast or compiled engine in bfloat16: float32 in and
    out, ~0.4% error in the features (cosine >= 0.99999 to TF's), faster where the CPU has
    AVX512-BF16 or AMX (:mod:`imvec.engines` has the numbers).
    """
    if variant is not None and variant not in VARIANTS:
        close = difflib.get_close_matches(str(variant), VARIANTS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown variant {variant!r}; {hint}choose one of "
                         f"{', '.join(VARIANTS)} (or None: what the source says)")
    options = dict(trainable=trainable, tags=tags, batch_norm_momentum=batch_norm_momentum,
                   engine=engine, precision=precision)
    path = Path(handle_or_path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"no such weights file: {path}")
        check_metadata(path)
        with_logits = None if variant is None else variant == "classification"
        net, card, metadata = load_converted(path, with_logits=with_logits)
        names = class_names(metadata) if card.variant == "classification" else None
        return Module(net, card, source=str(path), hparams=json.loads(metadata["hparams"]),
                      class_names=names, **options)
    text = os.fspath(handle_or_path)
    if sources.is_registry_name(text):
        card = sources.identify(text, variant)
        if arch is not None and find_card(arch).network != card.network:
            raise ValueError(f"{text} is {card.handle} ({card.network}); arch={arch!r} "
                             "contradicts it")
        if not pretrained:
            return Module(card.build(), card, **options)
        cached = sources.ensure_weights(card, prefer_ema=prefer_ema)
    else:
        card = sources.card_for(text, arch, variant)
        if not pretrained:
            return Module(card.build(), card, **options)
        cached = sources.ensure_source_weights(text, card, prefer_ema=prefer_ema)
    net, _, metadata = load_converted(cached, with_logits=card.variant == "classification")
    return Module(net, card, source=str(cached), hparams=json.loads(metadata["hparams"]),
                  **options)


def check_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a converted file, checked: one clear error naming the file and the
    field, rather than a JSON or key error from deep inside the load."""
    metadata = read_metadata(path)
    fix = "convert the original weights again with `imvec convert`"
    for key in _REQUIRED_METADATA:
        if not metadata.get(key):
            raise ImvecError(f"{path}: damaged metadata, {key!r} is missing; {fix}")
    for key in _JSON_METADATA:
        if metadata.get(key):
            try:
                json.loads(metadata[key])
            except ValueError as exc:
                raise ImvecError(f"{path}: damaged metadata, {key!r} is not valid JSON "
                                 f"({exc}); {fix}") from None
    if not isinstance(json.loads(metadata["hparams"]), dict):
        raise ImvecError(f"{path}: damaged metadata, 'hparams' is not a JSON object; {fix}")
    if metadata.get("num_classes") and not metadata["num_classes"].isdigit():
        raise ImvecError(f"{path}: damaged metadata, 'num_classes' is "
                         f"{metadata['num_classes']!r}, not a count; {fix}")
    return metadata


def create_model(name: str, num_classes: int | None = None, **hparams: Any) -> nn.Module:
    """The plain network (NCHW, the network's own [-1, 1] range), randomly initialised.

    ``name`` is a short name or handle (its card's hyper-parameters apply) or a network
    family (``nasnet_mobile``, ``mobilenet_v1``, ...); ``hparams`` override them.
    """
    try:
        card = find_card(name)
    except ValueError:
        return build_network(name, num_classes=num_classes, **hparams)
    return build_network(card.network, num_classes=num_classes, **{**card.hparams, **hparams})
