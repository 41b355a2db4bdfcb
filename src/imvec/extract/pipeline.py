"""The local engine: worker processes decode, the main process runs the model and commits.

Workers decode each batch straight into a shared buffer (:mod:`imvec.extract.pool`) that
the model reads in place. With the model on a GPU, the next batches decode while the
model works on the current one. With the model on the CPU, both need the same cores, and
taking turns is faster: a decoding worker that preempts one of the model's threads
stalls all the others at the next barrier: on 2 cores overlapping reached 0.84-1.02 of
the rate the two allow together, taking turns a steadier 0.92-1.01
(benchmarks/bench_extract.py). Rows reach the work folder in listing
order, failures in their place, and are committed every ``commit_every`` images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from imvec.data.decode import DEFAULT_DECODE_TIMEOUT
from imvec.data.sources import Item
from imvec.extract.dataset import compute_shard
from imvec.extract.manifest import read_manifest
from imvec.extract.pool import DecodePool
from imvec.extract.workdir import WorkDir
from imvec.module import Module

__all__ = ["model_embedder", "run_local", "run_shards_local"]

GPU_LOOKAHEAD = 2  # batches decoded ahead while a GPU runs the current one


def model_embedder(module: Module, device: torch.device) -> Callable[[np.ndarray], np.ndarray]:
    """``embed(images)``: features of images already in the network's range (NHWC)."""
    def embed(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(images).to(device, non_blocking=True)
            return module.forward_scaled(x).float().cpu().numpy()

    return embed


def run_local(module: Module, todo: Sequence[Item], work: WorkDir, preprocessing,
              batch_size: int, workers: int, device: torch.device,
              progress: Callable[[int], None], overlap: bool | None = None,
              decode_timeout: float | None = DEFAULT_DECODE_TIMEOUT) -> None:
    """Compute ``todo`` into ``work`` (committing as it goes). ``overlap``: decode while the
    model runs (default: when the model is not on the CPU), else take turns.
    ``decode_timeout``: seconds one image may take (see :class:`DecodePool`)."""
    embed = model_embedder(module, device)
    if overlap is None:
        overlap = device.type != "cpu"
    with DecodePool(preprocessing, workers, batch_size,
                    lookahead=GPU_LOOKAHEAD if overlap else 0, deadline=decode_timeout) as pool:
        for batch in pool.batches(todo):
            # Failed rows run too (their features are dropped): no copy to leave them out.
            features = (embed(batch.images) if any(e is None for e in batch.errors)
                        else None)
            work.add([i.id for i in batch.items], [i.path for i in batch.items], features,
                     batch.errors)
            progress(len(batch.items))


def run_shards_local(module: Module, folder, shards: Sequence[int], shard_size: int,
                     record: dict, preprocessing, batch_size: int, workers: int,
                     device: torch.device, progress: Callable[[int], None],
                     verify_inputs: bool = False,
                     decode_timeout: float | None = DEFAULT_DECODE_TIMEOUT) -> None:
    """Compute ``shards`` of an output folder, each written by this process when done."""
    embed = model_embedder(module, device)
    lookahead = GPU_LOOKAHEAD if device.type != "cpu" else 0
    with DecodePool(preprocessing, workers, batch_size, lookahead=lookahead,
                    deadline=decode_timeout) as pool:
        for index in shards:
            compute_shard(folder, index, index * shard_size, read_manifest(folder, index),
                          pool, embed, record, verify_inputs, progress)
