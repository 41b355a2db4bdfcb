"""What a fine-tuning run is: one dataclass, with defaults that depend on the mode.

``head`` trains a new logits layer on frozen features (computed once and cached), the
linear probe that TF-Hub's image retraining made popular: AdamW, lr 1e-3, batch 64,
30 epochs (cheap: an epoch reads cached features, not images).
``full`` trains the whole network on its training graph (batch-norm batch statistics,
dropout and drop path as the model cards describe): SGD with momentum 0.9 and lr
0.005 per 32 images (TF-Hub's ``make_image_classifier`` setting), batch 32, one warm-up
epoch, 10 epochs. Both use a cosine schedule and label smoothing 0.1.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["MODES", "FinetuneConfig"]

MODES = ("head", "full")
OPTIMIZERS = ("sgd", "adamw")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")  # autocast dtypes, named as torch's
_OLD_PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "head": dict(epochs=30, batch_size=64, optimizer="adamw", weight_decay=1e-4,
                 warmup_epochs=0.0),
    "full": dict(epochs=10, batch_size=32, optimizer="sgd", weight_decay=4e-5,
                 warmup_epochs=1.0),
}
# Fields that may change when a run resumes: where and how fast it runs, not what it computes.
OPERATIONAL = frozenset({"resume", "workers", "device", "output", "precision"})


@dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tuning job. ``None`` means the mode's default (see the module docstring).

    ``batch_size`` is global: with N processes each takes ``batch_size / N``.
    ``image_size`` may differ from the card's only for variable-size modules (MobileNet).
    ``dropout`` / ``drop_path_keep_prob`` / ``batch_norm_momentum`` override the
    network's own training settings (0.5 dense dropout on the NAS nets, 0.999 keep on
    MobileNet; the card's drop-path schedule; BN decay 0.99).
    """

    data: str
    model: str
    output: str
    mode: str = "head"
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    optimizer: str | None = None
    momentum: float = 0.9
    weight_decay: float | None = None
    warmup_epochs: float | None = None
    label_smoothing: float = 0.1
    val_data: str | None = None
    val_fraction: float = 0.1
    path_column: str = "path"
    label_column: str = "label"
    image_size: int | None = None
    central_fraction: float = 0.875
    augment_views: int = 1
    dropout: float | None = None
    drop_path_keep_prob: float | None = None
    batch_norm_momentum: float | None = None
    grad_checkpointing: bool = False
    sync_bn: bool = False
    pretrained: bool = True
    seed: int = 0
    workers: int = 2
    device: str | None = None
    precision: str = "auto"
    resume: bool = False

    def resolved(self) -> FinetuneConfig:
        """The same job with every default filled in and every value checked."""
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        filled = {k: v if getattr(self, k) is None else getattr(self, k)
                  for k, v in _DEFAULTS[self.mode].items()}
        filled["precision"] = _OLD_PRECISIONS.get(self.precision, self.precision)
        config = dataclasses.replace(self, **filled)
        if config.lr is None:
            lr = 1e-3 if config.optimizer == "adamw" else 0.005 * config.batch_size / 32
            config = dataclasses.replace(config, lr=lr)
        config._check()
        return config

    def _check(self) -> None:
        checks = [
            (self.epochs >= 1, f"epochs must be at least 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be at least 1, got {self.batch_size}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got "
             f"{self.optimizer!r}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1), got "
             f"{self.label_smoothing}"),
            (0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got "
             f"{self.val_fraction}"),
            (0 < self.central_fraction <= 1, "central_fraction must be in (0, 1], got "
             f"{self.central_fraction}"),
            (self.augment_views >= 1, f"augment_views must be >= 1, got {self.augment_views}"),
            (self.augment_views == 1 or self.mode == "head", "augment_views applies to "
             "--mode head (full mode augments every epoch)"),
            (self.dropout is None or 0 <= self.dropout < 1, f"dropout must be in [0, 1), got "
             f"{self.dropout}"),
            (self.drop_path_keep_prob is None or 0 < self.drop_path_keep_prob <= 1,
             f"drop_path_keep_prob must be in (0, 1], got {self.drop_path_keep_prob}"),
            (self.batch_norm_momentum is None or 0 <= self.batch_norm_momentum <= 1,
             "batch_norm_momentum must be a TF decay in [0, 1] such as 0.99, got "
             f"{self.batch_norm_momentum}"),
            (self.momentum >= 0, f"momentum must be >= 0, got {self.momentum}"),
            *((self.mode == "full" or not value, f"{name} applies to --mode full (head mode "
               "trains a linear layer on frozen features, which it would not change)")
              for name, value in (("batch_norm_momentum", self.batch_norm_momentum is not None),
                                  ("drop_path_keep_prob", self.drop_path_keep_prob is not None),
                                  ("grad_checkpointing", self.grad_checkpointing),
                                  ("sync_bn", self.sync_bn))),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got "
             f"{self.precision!r}"),
            (self.workers >= 0, f"workers must be >= 0, got {self.workers}"),
            (self.image_size is None or self.image_size >= 32, "image_size must be at least "
             f"32, got {self.image_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def differences(self, saved: dict[str, Any]) -> list[str]:
        """Fields (other than operational ones) whose value differs from ``saved``."""
        mine = self.to_dict()
        return [f"{k}: run has {saved.get(k)!r}, now {mine[k]!r}" for k in sorted(mine)
                if k not in OPERATIONAL and saved.get(k) != mine[k]]
