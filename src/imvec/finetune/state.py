"""Training state on disk: written atomically, complete enough to resume bit for bit.

A checkpoint holds the model, optimizer, scheduler and gradient-scaler states, the epoch
it completed, the metrics so far and every process's training RNG states. Augmentation and
shuffling are functions of (seed, epoch, index), and dropout and drop-path masks come from
the training RNG (:class:`TrainingRNG`), which nothing else draws from, so restoring these
states at an epoch boundary replays the rest of the run exactly.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from imvec._io import atomic_path, atomic_write_bytes, atomic_write_text
from imvec.errors import CheckpointError

__all__ = ["TrainingRNG", "atomic_write_bytes", "atomic_write_text", "load_checkpoint",
           "save_checkpoint"]

CHECKPOINT_VERSION = 1


class TrainingRNG:
    """The random state of the training steps alone: dropout and drop-path masks.

    The networks draw their masks from torch's global generator (``nn.Dropout``, drop
    path). Anything else may draw from it as well, between steps or before the first one
    (an ONNX export, the feature-caching pass, a data loader's seed, the caller's code), and
    how much depends on what is cached or already built. So the training steps run inside
    :meth:`active`, which swaps in a state of their own (seeded from the run's seed) and
    swaps it out again afterwards: the masks depend on the seed and the steps taken, nothing
    else, and the state is what a checkpoint saves.
    """

    def __init__(self, seed: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        cpu = torch.Generator().manual_seed(seed).get_state()
        self.state: dict[str, Any] = {"torch": cpu}
        if self.cuda:
            with torch.random.fork_rng(devices=[device]), torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
                self.state["cuda"] = torch.cuda.get_rng_state(device)

    def _swap(self, state: dict[str, Any]) -> dict[str, Any]:
        """Install ``state`` into the global generators; return what was there."""
        previous: dict[str, Any] = {"torch": torch.get_rng_state()}
        torch.set_rng_state(state["torch"])
        if self.cuda:
            previous["cuda"] = torch.cuda.get_rng_state(self.device)
            if "cuda" in state:
                torch.cuda.set_rng_state(state["cuda"], self.device)
        return previous

    @contextmanager
    def active(self) -> Iterator[None]:
        """Within the block the global generators are the training ones."""
        outside = self._swap(self.state)
        try:
            yield
        finally:
            self.state = self._swap(outside)

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = {k: v for k, v in state.items() if k == "torch" or self.cuda}
        if self.cuda and "cuda" in state and isinstance(state["cuda"], list | tuple):
            self.state["cuda"] = state["cuda"][self.device.index or 0]  # older checkpoints


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save({"version": CHECKPOINT_VERSION, **state}, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state saved by :func:`save_checkpoint` (tensors on the CPU)."""
    fix = (f"delete it to start the run over from epoch 0 (the cached features in "
           f"{path.parent / 'cache'} are kept), or restore it from a backup")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 (torch raises OSError, pickle and zip errors)
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CheckpointError(f"{path} is damaged and cannot be read ({reason}); {fix}"
                              ) from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        raise CheckpointError(f"{path} is a checkpoint of another format (version "
                              f"{version!r}); {fix}")
    missing = {"epoch", "model", "optimizer", "scheduler", "scaler", "rng", "metrics"} - set(state)
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(sorted(missing))}; {fix}")
    return state
