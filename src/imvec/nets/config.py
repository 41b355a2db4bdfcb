"""Hyper-parameter overrides shared by the network families."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def override(config: T, hparams: dict[str, Any]) -> T:
    """``config`` with ``hparams`` replaced; an unknown name is an error listing the valid ones."""
    names = [f.name for f in dataclasses.fields(config)]
    unknown = sorted(set(hparams) - set(names))
    if unknown:
        raise ValueError(
            f"unknown hyper-parameter(s) {', '.join(unknown)} for {type(config).__name__}; "
            f"valid: {', '.join(names)}"
        )
    return dataclasses.replace(config, **hparams)
