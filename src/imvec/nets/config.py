"""Hyper-parameter overrides shared by the network families."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

T = TypeVar("T")

# Sane bounds of each hyper-parameter (inclusive; None = open), checked before anything is
# built: num_cells=3000 would otherwise build for many seconds before failing. The TF
# configurations lie well inside (12-18 cells, 44-448 filters).
BOUNDS: dict[str, tuple[type, float | None, float | None]] = {
    "num_cells": (int, 1, 64),
    "num_conv_filters": (int, 1, 4096),
    "reduction_size": (int, 1, 4096),
    "stem_reduction_size": (int, 1, 4096),
    "num_reduction_layers": (int, 0, 8),
    "skip_reduction_layer_input": (int, 0, 1),
    "min_depth": (int, 1, 4096),
    "stem_multiplier": (float, 0, 16),
    "filter_scaling_rate": (float, 0, 8),
    "depth_multiplier": (float, 0, 8),
    "drop_path_keep_prob": (float, 0, 1),
    "drop_connect_keep_prob": (float, 0, 1),
    "dense_dropout_keep_prob": (float, 0, 1),
    "dropout_keep_prob": (float, 0, 1),
    "batch_norm_epsilon": (float, 0, 1),
}
_STRICT_LOW = {"stem_multiplier", "filter_scaling_rate", "depth_multiplier",
               "drop_path_keep_prob", "drop_connect_keep_prob", "dense_dropout_keep_prob",
               "dropout_keep_prob", "batch_norm_epsilon"}  # these must be above their low


def check_hparam(name: str, value: Any) -> None:
    """A ``ValueError`` naming the hyper-parameter, its allowed range and the value."""
    if name not in BOUNDS:
        return
    kind, low, high = BOUNDS[name]
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if kind is int and not (numeric and isinstance(value, int)):
        raise ValueError(f"hyper-parameter {name} must be an integer in [{low}, {high}]; "
                         f"got {value!r}")
    if not numeric or not math.isfinite(value):
        raise ValueError(f"hyper-parameter {name} must be a number; got {value!r}")
    too_low = value <= low if name in _STRICT_LOW else value < low
    if too_low or value > high:
        opening = "(" if name in _STRICT_LOW else "["
        raise ValueError(f"hyper-parameter {name} must be in {opening}{low}, {high}]; got "
                         f"{value!r}")


def override(config: T, hparams: dict[str, Any]) -> T:
    """``config`` with ``hparams`` replaced; an unknown name is an error listing the valid ones."""
    names = [f.name for f in dataclasses.fields(config)]
    unknown = sorted(set(hparams) - set(names))
    if unknown:
        raise ValueError(
            f"unknown hyper-parameter(s) {', '.join(unknown)} for {type(config).__name__}; "
            f"valid: {', '.join(names)}"
        )
    for name, value in hparams.items():
        check_hparam(name, value)
    return dataclasses.replace(config, **hparams)
