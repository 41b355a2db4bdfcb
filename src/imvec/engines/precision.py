"""The precisions an inference engine runs in."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PRECISIONS", "check_precision", "in_precision"]

PRECISIONS = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_PRECISION_ALIASES = {"fp32": "float32", "bf16": "bfloat16"}


def check_precision(precision: str | None) -> str:
    """The canonical name of a precision ("float32", "bfloat16"; "fp32" and "bf16" too)."""
    name = _PRECISION_ALIASES.get(precision or "float32", precision or "float32")
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of "
                         f"{', '.join(PRECISIONS)}")
    return name


def in_precision(graph: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``graph`` in ``dtype``; float32 leaves it as built (a ``.double()`` net stays so)."""
    return graph if dtype == torch.float32 else graph.to(dtype)
