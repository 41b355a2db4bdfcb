"""Frozen features for head-only training, computed once and kept on disk.

The cache lives in ``RUN_DIR/cache/<key>/``, where the key covers everything that
determines the numbers (model file, hyper-parameters, images, size, views, seed). It is
written in chunks, each atomically and by one process (chunk j by rank j mod world size),
so an interrupted or distributed caching pass loses at most the chunks in flight.
View 0 is the evaluation crop; views 1.. are augmented crops (``augment_views``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from imvec._io import atomic_path
from imvec.finetune.data import PIXELS, ImageDataset, LabeledImages
from imvec.finetune.distributed import Context, barrier
from imvec.module import Module

__all__ = ["CHUNK", "cache_key", "cached_features"]

CHUNK = 512  # examples per cache file
log = logging.getLogger("imvec.finetune")


def cache_key(base: Module, images: LabeledImages, size: tuple[int, int], views: int,
              seed: int, central_fraction: float) -> str:
    source = str(base.source)
    stamp = None
    if os.path.isfile(source):
        stat = os.stat(source)
        stamp = [stat.st_size, stat.st_mtime_ns]
    spec = dict(source=source, stamp=stamp, hparams=dict(base.hparams), size=list(size),
                views=views, seed=seed, central_fraction=central_fraction,
                paths=list(images.paths), labels=list(images.labels), pixels=PIXELS)
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def cached_features(
    base: Module,
    images: LabeledImages,
    cache_dir: Path,
    *,
    size: tuple[int, int],
    views: int,
    seed: int,
    central_fraction: float,
    batch_size: int,
    workers: int,
    ctx: Context,
    autocast: Callable[[], AbstractContextManager],
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [views, N, D] float32, labels [N])`` on the CPU; label -1 marks an
    image that could not be decoded."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    dataset = ImageDataset(images, size, augment=False, seed=seed,
                           central_fraction=central_fraction)
    chunks = math.ceil(len(images) / CHUNK)
    jobs = [(v, c) for v in range(views) for c in range(chunks)]
    if ctx.is_main and not all(_chunk(cache_dir, v, c).is_file() for v, c in jobs):
        log.info("computing features of %d images x %d view(s) into %s", len(images), views,
                 cache_dir)
    for j, (view, chunk) in enumerate(jobs):
        path = _chunk(cache_dir, view, chunk)
        if j % ctx.world_size != ctx.rank or path.is_file():
            continue
        dataset.augment = view > 0
        dataset.set_epoch(view)
        indices = range(chunk * CHUNK, min((chunk + 1) * CHUNK, len(images)))
        features, labels = _compute(base, dataset, list(indices), batch_size, workers, ctx,
                                    autocast)
        with atomic_path(path, durable=False) as tmp:  # recomputed if lost: no fsync
            save_file({"features": features, "labels": labels}, str(tmp))
    barrier(ctx)
    per_view = []
    labels = torch.empty(0, dtype=torch.long)
    for view in range(views):
        parts = [load_file(str(_chunk(cache_dir, view, c))) for c in range(chunks)]
        per_view.append(torch.cat([p["features"] for p in parts]))
        if view == 0:
            labels = torch.cat([p["labels"] for p in parts])
    return torch.stack(per_view), labels


def _chunk(cache_dir: Path, view: int, chunk: int) -> Path:
    return cache_dir / f"view{view}-{chunk:05d}.safetensors"


@torch.no_grad()
def _compute(base: Module, dataset: ImageDataset, indices: list[int], batch_size: int,
             workers: int, ctx: Context, autocast: Callable[[], AbstractContextManager]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=indices,
                                         num_workers=workers)
    features, labels = [], []
    for images, label, _ in loader:
        x = images.to(ctx.device, non_blocking=True)  # float32 in [0, 1]: the module's input
        with autocast():
            features.append(base(x).float().cpu())
        labels.append(label)
    return torch.cat(features).contiguous(), torch.cat(labels).long()
