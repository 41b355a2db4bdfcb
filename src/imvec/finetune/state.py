"""Training state on disk: written atomically, complete enough to resume bit for bit.

A checkpoint holds the model, optimizer, scheduler and gradient-scaler states, the epoch
it completed, the metrics so far and every process's RNG states. Augmentation and
shuffling are functions of (seed, epoch, index), so restoring these states at an epoch
boundary replays the rest of the run exactly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_write_bytes", "atomic_write_text", "get_rng_state", "load_checkpoint",
           "save_checkpoint", "set_rng_state"]

CHECKPOINT_VERSION = 1


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` is either the old file or the complete new one."""
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def get_rng_state() -> dict[str, Any]:
    """The torch RNG states this process draws dropout and drop-path masks from."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    tmp = _temporary(path)
    try:
        torch.save({"version": CHECKPOINT_VERSION, **state}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state saved by :func:`save_checkpoint` (tensors on the CPU)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is a checkpoint of another format (version "
                         f"{state.get('version')!r}); start a new run directory")
    return state

