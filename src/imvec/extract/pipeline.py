"""The local engine: worker processes decode, the main process runs the model and commits.

With the model on a GPU, decoded chunks queue up (bounded) while the model works on the
current batch, so decoding and inference overlap. With the model on the CPU, both need the
same cores, and taking turns is faster: a decoding worker that preempts one of the model's
threads stalls all the others at the next barrier, so overlapping cost about a third of the
throughput on 2 cores, while turns reach the rate the two allow together
(benchmarks/bench_extract.py). Rows reach the work folder in listing order, failures in
their place, and are committed every ``commit_every`` images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from imvec.data.sources import Item
from imvec.extract.pool import Decoded, DecodePool
from imvec.extract.workdir import WorkDir
from imvec.module import Module

__all__ = ["Batcher", "chunked", "run_local"]


def chunked(items: Sequence[Item], size: int):
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Batcher:
    """Collects decoded chunks, runs the model on full batches, hands rows on in order."""

    def __init__(self, embed: Callable[[np.ndarray], np.ndarray], batch_size: int, dim: int,
                 emit: Callable[[list[Item], np.ndarray, list[str | None]], None]) -> None:
        self.embed, self.batch_size, self.dim, self.emit = embed, batch_size, dim, emit
        self._items: list[Item] = []
        self._errors: list[str | None] = []
        self._images: list[np.ndarray] = []
        self._ready = 0  # decoded images waiting for the model

    def add(self, chunk: Decoded) -> None:
        self._items.extend(chunk.items)
        self._errors.extend(chunk.errors)
        if len(chunk.images):
            self._images.append(chunk.images)
            self._ready += len(chunk.images)
        while self._ready >= self.batch_size:
            self._step(self.batch_size)

    def flush(self) -> None:
        while self._ready:
            self._step(min(self._ready, self.batch_size))
        if self._items:  # failures after the last image
            self._emit_rows(len(self._items), np.empty((0, self.dim), np.float32))

    def _step(self, count: int) -> None:
        images = np.concatenate(self._images) if len(self._images) > 1 else self._images[0]
        batch, rest = images[:count], images[count:]
        self._images = [rest] if len(rest) else []
        self._ready -= count
        features = self.embed(batch)
        # Hand on every row up to the last image of this batch (failures in between).
        ok_seen, end = 0, 0
        while ok_seen < count:
            ok_seen += self._errors[end] is None
            end += 1
        self._emit_rows(end, features)

    def _emit_rows(self, end: int, features: np.ndarray) -> None:
        items, errors = self._items[:end], self._errors[:end]
        del self._items[:end], self._errors[:end]
        full = np.zeros((end, self.dim), np.float32)
        full[[e is None for e in errors]] = features
        self.emit(items, full, errors)


def model_embedder(module: Module, device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
    def embed(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            images = torch.from_numpy(batch).to(device, non_blocking=True)
            return module(images).float().cpu().numpy()

    return embed


def run_local(module: Module, todo: Sequence[Item], work: WorkDir, preprocessing,
              batch_size: int, workers: int, device: torch.device,
              progress: Callable[[int], None], overlap: bool | None = None) -> None:
    """Compute ``todo`` into ``work`` (committing as it goes). ``overlap``: decode while the
    model runs (default: when the model is not on the CPU), else take turns."""
    def emit(items: list[Item], features: np.ndarray, errors: list[str | None]) -> None:
        work.add([i.id for i in items], [i.path for i in items], features, errors)
        progress(len(items))

    batcher = Batcher(model_embedder(module, device), batch_size, work.dim, emit)
    chunk = max(1, min(16, -(-batch_size // workers)))
    if overlap is None:
        overlap = device.type != "cpu"
    with DecodePool(preprocessing, workers) as pool:
        if overlap:
            for decoded in pool.imap(chunked(todo, chunk)):
                batcher.add(decoded)
        else:
            for group in chunked(todo, batch_size):
                for decoded in list(pool.imap(chunked(group, chunk))):  # all, then the model
                    batcher.add(decoded)
    batcher.flush()
