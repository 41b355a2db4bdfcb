"""TF variable names <-> PyTorch parameter names, by one generic rule.

The module tree mirrors TF's variable scopes, so a name maps by replacing ``/`` with ``.``
and renaming the leaf by the module that owns it:

=========================  ===========================  ==============================
TF leaf                    PyTorch                      layout change
=========================  ===========================  ==============================
conv ``weights``           ``weight``                   HWIO -> OIHW
``depthwise_weights``      ``depthwise.weight``         [kh, kw, C, 1] -> [C, 1, kh, kw]
``pointwise_weights``      ``pointwise.weight``         HWIO -> OIHW
fully connected            ``weight`` / ``bias``        [in, out] -> [out, in]
``weights`` / ``biases``
BN ``gamma`` ``beta``      ``weight`` ``bias``          none
``moving_mean``            ``running_mean``             none
``moving_variance``        ``running_var``              none
=========================  ===========================  ==============================

A network may live under a top scope (``MobilenetV1``): its ``tf_scope`` attribute. BN's
``num_batches_tracked`` has no TF twin and is skipped on purpose.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from imvec.errors import CheckpointMismatchError, summarize_names

__all__ = [
    "Binding",
    "IGNORED_PATTERNS",
    "ignored",
    "load_tf_variables",
    "tf_bindings",
    "to_tf_layout",
    "to_torch_layout",
    "variable_map",
]

# Checkpoint entries that are knowingly not network weights: the training-only aux head,
# the step counter, EMA shadow copies and optimizer slots.
IGNORED_PATTERNS = (
    r"(.*/)?aux_\d+/.*",
    r"global_step",
    r".*/ExponentialMovingAverage(_\d+)?",
    r".*/(Momentum|RMSProp(_1)?|Adam(_1)?|Adagrad|Ftrl(_1)?)",
    r"beta[12]_power",
    r"_CHECKPOINTABLE_OBJECT_GRAPH",
)
_IGNORED = re.compile("|".join(f"(?:{p})" for p in IGNORED_PATTERNS))


def ignored(name: str) -> bool:
    """True for checkpoint entries that are knowingly not network weights."""
    return _IGNORED.fullmatch(name) is not None


@dataclass(frozen=True)
class Binding:
    param: str  # PyTorch state_dict key
    layout: str  # "conv", "depthwise", "dense" or "vector"


def tf_bindings(net: nn.Module) -> dict[str, Binding]:
    """``{TF variable name: Binding}`` for every tensor of ``net`` that TF stores."""
    scope = getattr(net, "tf_scope", "")
    bindings: dict[str, Binding] = {}

    def tf_name(path: str) -> str:
        return "/".join(filter(None, [scope, path.replace(".", "/")]))

    for path, module in net.named_modules():
        parent, _, leaf = path.rpartition(".")
        if isinstance(module, nn.BatchNorm2d):
            for tf_leaf, torch_leaf in (("gamma", "weight"), ("beta", "bias"),
                                        ("moving_mean", "running_mean"),
                                        ("moving_variance", "running_var")):
                bindings[tf_name(f"{path}.{tf_leaf}")] = Binding(f"{path}.{torch_leaf}", "vector")
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            dense = isinstance(module, nn.Linear)
            if leaf in ("depthwise", "pointwise"):
                name = tf_name(f"{parent}.{leaf}_weights")
                layout = "depthwise" if leaf == "depthwise" else "conv"
            else:
                name, layout = tf_name(f"{path}.weights"), "dense" if dense else "conv"
            bindings[name] = Binding(f"{path}.weight", layout)
            if module.bias is not None:
                bindings[tf_name(f"{path}.biases")] = Binding(f"{path}.bias", "vector")
    return bindings


def to_torch_layout(array: np.ndarray | torch.Tensor, layout: str) -> torch.Tensor:
    tensor = torch.as_tensor(array)
    if layout == "conv":
        return tensor.permute(3, 2, 0, 1)
    if layout == "depthwise":  # [kh, kw, C, m] -> [C * m, 1, kh, kw]
        kh, kw, c, m = tensor.shape
        return tensor.permute(2, 3, 0, 1).reshape(c * m, 1, kh, kw)
    if layout == "dense":
        return tensor.t()
    return tensor


def to_tf_layout(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """A view of ``tensor`` in TF layout (live: it shares memory with the parameter)."""
    if layout == "conv":
        return tensor.permute(2, 3, 1, 0)
    if layout == "depthwise":
        return tensor.permute(2, 3, 0, 1)
    if layout == "dense":
        return tensor.t()
    return tensor


def variable_map(net: nn.Module) -> dict[str, torch.Tensor]:
    """``{TF variable name: live tensor in TF layout}``, moving statistics included."""
    state = net.state_dict(keep_vars=True)
    return {name: to_tf_layout(state[b.param].detach(), b.layout)
            for name, b in tf_bindings(net).items()}


def load_tf_variables(net: nn.Module, variables: Mapping[str, np.ndarray | torch.Tensor]) -> None:
    """Copy TF-named tensors into ``net``, strictly (a network built on the meta device
    takes them as its tensors).

    Every tensor must map to a parameter of the right shape and every parameter must be
    filled; entries matched by :data:`IGNORED_PATTERNS` are skipped knowingly.
    """
    bindings = tf_bindings(net)
    unmapped = {n for n in variables if n not in bindings and not ignored(n)}
    missing = set(bindings) - set(variables)
    state = net.state_dict()
    wrong_shape = []
    converted = {}
    for name, binding in bindings.items():
        if name not in variables:
            continue
        array = variables[name]
        value, target = to_torch_layout(array, binding.layout), state[binding.param]
        if value.shape != target.shape:
            tf_expected = tuple(to_tf_layout(target, binding.layout).shape)
            wrong_shape.append(f"{name}: checkpoint {tuple(np.shape(array))}, "
                               f"network {tf_expected}")
            continue
        # contiguous in the network's dtype now, so that the checkpoint's array (a layout
        # view's base) is freed at once: conversion holds one copy of the weights
        converted[binding.param] = value.to(dtype=target.dtype).contiguous()
        del array, value
    if unmapped or missing or wrong_shape:
        problems = []
        if unmapped:
            problems.append(f"{len(unmapped)} checkpoint tensor(s) the network does not have: "
                            f"{summarize_names(unmapped)}")
        if missing:
            problems.append(f"{len(missing)} network variable(s) missing from the checkpoint: "
                            f"{summarize_names(missing)}")
        if wrong_shape:
            problems.append(f"{len(wrong_shape)} shape mismatch(es): "
                            f"{summarize_names(wrong_shape, limit=5)}")
        raise CheckpointMismatchError(
            "the checkpoint does not fit this network ("
            + "; ".join(problems)
            + "). Check the architecture and its hyper-parameters (e.g. --arch/--hparam).")
    if next(iter(state.values())).is_meta:  # built without memory: these become its tensors
        net.load_state_dict(converted, strict=False, assign=True)
        return
    with torch.no_grad():
        for param, value in converted.items():
            state[param].copy_(value)
