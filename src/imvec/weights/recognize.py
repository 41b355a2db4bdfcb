"""Which registry network a set of TF variables is, and whether it is all of that network.

A module fetched by hand carries no handle, but its variable names and shapes say which
network it holds. They are compared with each card's network, built on the meta device (no
memory, no weights read), by the rule the conversion itself uses (:mod:`imvec.weights.mapping`):
every variable present with its shape, nothing unknown besides the entries conversion skips
on purpose. ``imvec cache add`` refuses an incomplete module with this check before writing
anything; ``imvec.hub.load_module_spec`` names a local module with it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from imvec.errors import CheckpointMismatchError, summarize_names
from imvec.registry import CARDS, Card, build_network, find_card
from imvec.weights.convert import LOGITS_PREFIXES
from imvec.weights.mapping import ignored, tf_bindings, to_tf_layout

__all__ = ["expected_shapes", "has_logits", "mismatches", "recognize"]

Shapes = Mapping[str, tuple[int, ...]]


def has_logits(names: Shapes) -> bool:
    return any(name.startswith(LOGITS_PREFIXES) for name in names)


def expected_shapes(card: Card, logits: bool) -> dict[str, tuple[int, ...]]:
    """``{TF variable name: TF shape}`` of the card's network (with the 1001-way logits
    layer when ``logits``, as conversion builds it)."""
    with torch.device("meta"):
        net = build_network(card.network, num_classes=1001 if logits else None, **card.hparams)
    state = net.state_dict()
    return {name: tuple(to_tf_layout(state[b.param], b.layout).shape)
            for name, b in tf_bindings(net).items()}


def _diff(card: Card, shapes: Shapes) -> tuple[list[str], list[str], list[str], int]:
    """(missing, wrong shape, unknown) names, and how many variables the network has."""
    expected = expected_shapes(card, has_logits(shapes))
    missing = [n for n in expected if n not in shapes]
    wrong = [f"{n}: {list(shapes[n])}, network {list(s)}" for n, s in expected.items()
             if n in shapes and tuple(shapes[n]) != s]
    unknown = [n for n in shapes if n not in expected and not ignored(n)]
    return missing, wrong, unknown, len(expected)


def mismatches(card: Card, shapes: Shapes) -> list[str]:
    """What keeps ``shapes`` (a checkpoint's names and shapes) from being a complete module
    for ``card``; empty when it is one."""
    problems = []
    if card.variant == "classification" and not has_logits(shapes):
        problems.append(f"no logits layer ({LOGITS_PREFIXES[0]}* or {LOGITS_PREFIXES[1]}*): "
                        f"a feature-vector module, not {card.handle}")
    missing, wrong, unknown, total = _diff(card, shapes)
    if missing:
        problems.append(f"{len(missing)} of the network's {total} variables missing: "
                        f"{summarize_names(missing, limit=5)}")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape: {summarize_names(wrong, limit=3)}")
    if unknown:
        problems.append(f"{len(unknown)} variable(s) the network does not have: "
                        f"{summarize_names(unknown, limit=5)}")
    return problems


def recognize(shapes: Shapes, source: str) -> Card:
    """The registry card whose network ``shapes`` fits exactly: the classification card when
    the logits layer is there, else the feature-vector one."""
    variant = "classification" if has_logits(shapes) else "feature_vector"
    tried = []
    for listed in CARDS:
        if listed.variant == variant:
            card = find_card(listed.handle)  # the registry index, which tests may shrink
            missing, wrong, unknown, _ = _diff(card, shapes)
            if not (missing or wrong or unknown):
                return card
            tried.append((len(missing) + len(wrong) + len(unknown), card))
    closest = min(tried, key=lambda t: t[0])[1]
    raise CheckpointMismatchError(
        f"{source} is none of the registry's networks; the closest is {closest.handle} "
        f"({'; '.join(mismatches(closest, shapes))}). If it is one of them with other "
        "hyper-parameters, convert it with `imvec convert SOURCE --arch NAME --hparam "
        "KEY=VALUE` and load the .safetensors file")
