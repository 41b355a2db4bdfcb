"""The two things a run can train, behind one interface.

``HeadTask``: a new logits layer (behind the network's own dropout) on frozen features
that were computed once and cached. ``FullTask``: the whole network, through the module's
training graph (``trainable=True, tags={"train"}``). Each yields batches of
(inputs, labels, dataset indices) for this process and turns inputs into logits; the
trainer does the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from imvec.finetune.config import FinetuneConfig
from imvec.finetune.data import ImageDataset, LabeledImages
from imvec.finetune.distributed import Context, average_buffers, wrap
from imvec.finetune.features import cache_key, cached_features
from imvec.finetune.model import (
    classification_card,
    classifier_keys,
    dropout_of,
    load_head,
    new_classifier,
)
from imvec.module import Module

__all__ = ["Batch", "FullTask", "HeadTask", "keeps_last_batch"]

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # inputs, labels, dataset indices


def keeps_last_batch(examples: int, batch: int) -> bool:
    """A short final batch is dropped unless it is the only one (BN needs no size-1 batch,
    and every step then weighs the same)."""
    return examples < batch


class HeadTask:
    def __init__(self, config: FinetuneConfig, ctx: Context, base: Module, train: LabeledImages,
                 val: LabeledImages, size: tuple[int, int],
                 autocast: Callable[[], AbstractContextManager]) -> None:
        self.config, self.ctx = config, ctx
        self.net = new_classifier(base, len(train.class_names))  # CPU trunk, before .to()
        self.keys = classifier_keys(base.card.network, dict(base.hparams))
        base.to(ctx.device)
        cache = Path(config.output) / "cache"
        common = dict(size=size, seed=config.seed, central_fraction=config.central_fraction,
                      batch_size=max(1, config.batch_size // ctx.world_size),
                      workers=config.workers, ctx=ctx, autocast=autocast)
        key = cache_key(base, train, size, config.augment_views, config.seed,
                        config.central_fraction)
        self.features, self.labels = cached_features(
            base, train, cache / f"train-{key}", views=config.augment_views, **common)
        self.val_features, self.val_labels = (torch.empty(0), torch.empty(0, dtype=torch.long))
        if len(val):
            key = cache_key(base, val, size, 1, config.seed, config.central_fraction)
            features, self.val_labels = cached_features(base, val, cache / f"val-{key}",
                                                        views=1, **common)
            self.val_features = features[0]
        base.cpu()
        p = dropout_of(self.net).p if config.dropout is None else config.dropout
        linear = nn.Linear(self.features.shape[-1], len(train.class_names))
        nn.init.zeros_(linear.weight)
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.Dropout(p), linear).to(ctx.device)
        self.model = wrap(self.head, ctx)
        self.sampler = DistributedSampler(range(len(train)), num_replicas=ctx.world_size,
                                          rank=ctx.rank, shuffle=True, seed=config.seed)
        self.batch = max(1, config.batch_size // ctx.world_size)

    @property
    def steps_per_epoch(self) -> int:
        n = len(self.sampler)
        return 1 if keeps_last_batch(n, self.batch) else n // self.batch

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        self.sampler.set_epoch(epoch)
        order = torch.tensor(list(self.sampler))
        views = self.features.shape[0]
        chosen = torch.zeros(len(self.labels), dtype=torch.long)
        if views > 1:
            rng = np.random.default_rng([self.config.seed, epoch, 1])
            chosen = torch.from_numpy(rng.integers(0, views, len(self.labels)))
        for step in range(self.steps_per_epoch):
            idx = order[step * self.batch:(step + 1) * self.batch]
            yield self.features[chosen[idx], idx], self.labels[idx], idx

    def val_batches(self) -> Iterator[Batch]:
        idx_all = torch.arange(self.ctx.rank, len(self.val_labels), self.ctx.world_size)
        for start in range(0, len(idx_all), self.batch):
            idx = idx_all[start:start + self.batch]
            yield self.val_features[idx], self.val_labels[idx], idx

    def logits(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        return model(inputs.to(self.ctx.device, non_blocking=True))

    def train(self, mode: bool) -> None:
        self.model.train(mode)

    @property
    def eval_model(self) -> nn.Module:
        return self.head

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.head.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.head.load_state_dict(state)

    def sync_buffers(self) -> None:
        """A linear head has no buffers."""

    def final_net(self) -> nn.Module:
        load_head(self.net, self.keys, self.head[1])
        return self.net


class FullTask:
    def __init__(self, config: FinetuneConfig, ctx: Context, base: Module, train: LabeledImages,
                 val: LabeledImages, size: tuple[int, int],
                 autocast: Callable[[], AbstractContextManager]) -> None:
        self.config, self.ctx = config, ctx
        classes = list(train.class_names)
        net = new_classifier(base, len(classes))
        self.module = Module(net, classification_card(base.card, len(classes)), trainable=True,
                             tags={"train"}, batch_norm_momentum=config.batch_norm_momentum,
                             hparams=dict(base.hparams), source=str(base.source),
                             class_names=classes)
        if config.dropout is not None:
            dropout_of(net).p = config.dropout
        if config.drop_path_keep_prob is not None:
            if not hasattr(net, "set_drop_path_keep_prob"):
                raise ValueError(f"{base.card.short_name} has no drop path; drop "
                                 "--drop-path-keep-prob")
            net.set_drop_path_keep_prob(config.drop_path_keep_prob)
        if config.grad_checkpointing:
            if not hasattr(net, "set_grad_checkpointing"):
                raise ValueError(f"{base.card.short_name} has no gradient checkpointing; drop "
                                 "--grad-checkpointing")
            net.set_grad_checkpointing(True)
        self.module.to(ctx.device)
        self.model = wrap(self.module, ctx, config.sync_bn)
        self.batch = max(1, config.batch_size // ctx.world_size)
        train_set = ImageDataset(train, size, augment=True, seed=config.seed)
        self.sampler = DistributedSampler(train_set, num_replicas=ctx.world_size, rank=ctx.rank,
                                          shuffle=True, seed=config.seed)
        pin = ctx.device.type == "cuda"
        self.loader = DataLoader(train_set, self.batch, sampler=self.sampler,
                                 num_workers=config.workers, pin_memory=pin,
                                 drop_last=not keeps_last_batch(len(self.sampler), self.batch))
        val_set = ImageDataset(val, size, augment=False, central_fraction=config.central_fraction)
        self.val_loader = DataLoader(val_set, self.batch,
                                     sampler=list(range(ctx.rank, len(val), ctx.world_size)),
                                     num_workers=config.workers, pin_memory=pin)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.loader)

    def train_batches(self, epoch: int) -> Iterator[Batch]:
        self.sampler.set_epoch(epoch)
        self.loader.dataset.set_epoch(epoch)
        yield from self.loader

    def val_batches(self) -> Iterator[Batch]:
        yield from self.val_loader

    def logits(self, model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        images = inputs.to(self.ctx.device, non_blocking=True)  # float32 in [0, 1]
        return model(images)

    def train(self, mode: bool) -> None:
        self.model.train(mode)

    @property
    def eval_model(self) -> nn.Module:
        return self.module

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.net.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.net.load_state_dict(state)

    def sync_buffers(self) -> None:
        if not self.config.sync_bn:
            average_buffers(self.module.net, self.ctx)

    def final_net(self) -> nn.Module:
        return self.module.net

