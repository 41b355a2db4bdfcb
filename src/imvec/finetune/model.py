"""From a pretrained module to a classifier of new classes, and to a self-describing file.

The classifier is the network's own classification graph (``final_layer/FC`` for the NAS
nets, ``Logits/Conv2d_1c_1x1`` for MobileNet, each behind its own dropout) with a fresh
layer of ``num_classes`` outputs, so the saved file is an ordinary converted file with
logits that ``imvec.load`` opens as a classification module.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imvec.module import Module
from imvec.registry import Card, build_network, find_card
from imvec.weights.convert import FORMAT, read_metadata, save_converted

__all__ = ["classification_card", "classifier_keys", "dropout_of", "load_head", "new_classifier",
           "save_classifier"]


def classification_card(card: Card, num_classes: int) -> Card:
    """The classification twin of ``card`` with ``num_classes`` logits."""
    if card.variant != "classification":
        card = find_card(card.handle.replace("/feature_vector/", "/classification/"))
    return dataclasses.replace(card, num_classes=num_classes)


def classifier_keys(network: str, hparams: dict[str, Any]) -> list[str]:
    """State-dict keys of the logits layer: those a classifier has and the trunk lacks."""
    with torch.device("meta"):
        trunk = set(build_network(network, None, **hparams).state_dict())
        full = build_network(network, 2, **hparams).state_dict()
    return sorted(set(full) - trunk)


def new_classifier(base: Module, num_classes: int) -> nn.Module:
    """``base``'s network with a zero-initialised logits layer of ``num_classes``.

    Zeros start every class at equal probability, and the layer still learns, since
    it is the last one. Trunk tensors are taken over (not copied) from ``base``.
    """
    network, hparams = base.card.network, dict(base.hparams)
    head = classifier_keys(network, hparams)
    with torch.device("meta"):
        net = build_network(network, num_classes, **hparams)
    trunk = {k: v for k, v in base.net.state_dict().items() if k in net.state_dict()
             and k not in head}
    missing, unexpected = net.load_state_dict(trunk, strict=False, assign=True)
    if sorted(missing) != head or unexpected:
        raise RuntimeError(f"{base.source}: trunk does not fit (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]})")
    for key in head:
        owner, _, name = key.rpartition(".")
        module = net.get_submodule(owner)
        old = getattr(module, name)
        setattr(module, name, nn.Parameter(torch.zeros(old.shape, dtype=torch.float32)))
    return net


def dropout_of(net: nn.Module) -> nn.Dropout:
    """The dropout in front of the network's logits layer."""
    layers = [m for m in net.modules() if isinstance(m, nn.Dropout)]
    if len(layers) != 1:
        raise RuntimeError(f"expected one dropout layer before the logits, found {len(layers)}")
    return layers[0]


def load_head(net: nn.Module, keys: list[str], linear: nn.Linear) -> None:
    """Put a trained ``Linear(num_features, num_classes)`` into the logits layer ``keys``
    (a Linear, or MobileNet's 1x1 conv: the same numbers in another shape)."""
    state = {"weight": linear.weight.detach(), "bias": linear.bias.detach()}
    with torch.no_grad():
        for key in keys:
            target = net.get_parameter(key)
            target.copy_(state[key.rpartition(".")[2]].reshape(target.shape))


def save_classifier(
    net: nn.Module,
    base: Module,
    path: Path,
    class_names: list[str],
    image_size: tuple[int, int],
    extra: dict[str, Any],
) -> Path:
    """Write the classifier with the card metadata ``imvec.load`` needs, plus its class
    names, the image size it was trained at and ``extra`` (how it was trained)."""
    source_sha = ""
    if str(base.source).endswith(".safetensors") and os.path.isfile(base.source):
        source_sha = read_metadata(base.source).get("source_sha256", "")
    metadata = {
        "format": FORMAT,
        "arch": base.card.short_name,
        "network": base.card.network,
        "hparams": json.dumps(dict(base.hparams), sort_keys=True),
        "num_classes": str(len(class_names)),
        "class_names": json.dumps(list(class_names)),
        "image_size": json.dumps(list(image_size)),
        "source": str(base.source),
        "source_sha256": source_sha,
        "finetune": json.dumps(extra, sort_keys=True),
    }
    cpu = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    with torch.device("meta"):
        twin = build_network(base.card.network, len(class_names), **dict(base.hparams))
    twin.load_state_dict(cpu, assign=True)
    return save_converted(twin, path, metadata)
