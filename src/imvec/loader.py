"""``imvec.load`` and ``imvec.create_model``: from a handle or a file to a network."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from imvec.module import Module
from imvec.registry import build_network, find_card
from imvec.weights.convert import load_converted

__all__ = ["create_model", "load", "weights_home"]


def weights_home() -> Path:
    """``$IMVEC_HOME`` (default ``~/.cache/imvec``)."""
    return Path(os.environ.get("IMVEC_HOME", Path.home() / ".cache" / "imvec"))


def load(
    handle_or_path: str | os.PathLike,
    *,
    trainable: bool = False,
    tags: set[str] | None = None,
    variant: str | None = None,
    pretrained: bool = True,
    batch_norm_momentum: float | None = None,
) -> Module:
    """A TF-Hub image module from a handle, its tfhub.dev URL, a short name, or a
    ``.safetensors`` file written by ``imvec convert``.

    ``variant`` ("feature_vector" or "classification") picks the twin where the source
    does not say (a short name or a file); the default is "feature_vector".
    ``pretrained=False`` builds the network with random weights, offline.
    """
    options = dict(trainable=trainable, tags=tags, batch_norm_momentum=batch_norm_momentum)
    path = Path(handle_or_path)
    if path.suffix == ".safetensors":
        if not path.is_file():
            raise FileNotFoundError(f"no such weights file: {path}")
        net, card, metadata = load_converted(path, with_logits=variant == "classification")
        return Module(net, card, source=str(path), hparams=json.loads(metadata["hparams"]),
                      **options)
    card = find_card(str(handle_or_path), variant)
    if not pretrained:
        return Module(card.build(), card, **options)
    cached = weights_home() / "weights" / f"{card.handle.replace('/', '--')}.safetensors"
    if not cached.is_file():
        sources = "\n".join(f"  {m.url}" for m in card.mirrors)
        raise FileNotFoundError(
            f"no converted weights for {card.handle} in {cached.parent}. Automatic download "
            f"is not available yet. Fetch one of\n{sources}\nunpack it and run `imvec convert "
            f"<checkpoint prefix> --arch {card.short_name} -o {cached}`; or pass "
            "pretrained=False for random weights.")
    net, _, _ = load_converted(cached, with_logits=card.variant == "classification")
    return Module(net, card, source=str(cached), **options)


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
