"""``finetune(config)``: from labelled images and a module to ``RUN_DIR/model.safetensors``.

Each epoch ends with a checkpoint, metrics and plot, all written atomically, so a crash
costs at most the epoch in progress and ``resume=True`` continues exactly where the last
checkpoint left off. On CUDA the forward passes run under autocast (bfloat16 where the GPU
supports it, else float16 with loss scaling). Dropout and drop-path masks come from a
training RNG of their own (:class:`~imvec.finetune.state.TrainingRNG`): the same job gives
the same weights whether features were cached or engines built before, and a resumed run
equals an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imvec.finetune import distributed
from imvec.finetune.config import FinetuneConfig
from imvec.finetune.data import LabeledImages, read_dataset, stratified_split
from imvec.finetune.distributed import Context, all_gather_objects, barrier, sum_all
from imvec.finetune.metrics import write_metrics
from imvec.finetune.model import save_classifier
from imvec.finetune.rundir import CHECKPOINT, MODEL, open_run, record_job
from imvec.finetune.state import TrainingRNG, atomic_write_text, save_checkpoint
from imvec.finetune.tasks import FullTask, HeadTask
from imvec.loader import load
from imvec.module import Module
from imvec.registry import find_card

__all__ = ["RunResult", "finetune", "load_base"]

log = logging.getLogger("imvec.finetune")


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    model_path: Path
    class_names: tuple[str, ...]
    history: list[dict[str, Any]]


def finetune(
    config: FinetuneConfig, on_epoch_end: Callable[[dict[str, Any]], None] | None = None
) -> RunResult:
    """Run (or resume) the job; ``on_epoch_end(metrics_row)`` follows each checkpoint."""
    config = config.resolved()
    ctx = distributed.setup(config.device)
    try:
        return _Trainer(config, ctx).run(on_epoch_end)
    finally:
        distributed.teardown(ctx)


def load_base(model: str, pretrained: bool = True) -> Module:
    """The frozen feature-vector module to fine-tune: a handle, a converted or fine-tuned
    ``.safetensors``, or a run directory (its ``model.safetensors``)."""
    path = Path(model)
    if path.is_dir():
        path = path / MODEL
        if not path.is_file():
            raise FileNotFoundError(f"{model} holds no {MODEL} (the run has not finished)")
    if path.suffix == ".safetensors":
        return load(path, variant="feature_vector")
    module = load(model, pretrained=pretrained)
    if module.card.variant == "classification":  # fine-tune the trunk of a classifier
        card = find_card(module.card.handle.replace("/classification/", "/feature_vector/"))
        module = Module(module.net, card, hparams=module.hparams, source=module.source)
    return module


def _autocast(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    if precision == "float32":
        return nullcontext
    dtype = getattr(torch, precision)
    return lambda: torch.autocast(device.type, dtype=dtype)


def _precision(requested: str, device: torch.device) -> str:
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "float32"
    return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"


def _schedule(total: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to zero, per optimizer step."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    """Weight decay on weights only (not on biases or batch-norm scale and offset), as
    TF-Slim's regularizers did."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() > 1], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.lr)


class _Trainer:
    def __init__(self, config: FinetuneConfig, ctx: Context) -> None:
        self.config, self.ctx = config, ctx
        self.run_dir = Path(config.output)
        self.precision = _precision(config.precision, ctx.device)
        self.autocast = _autocast(self.precision, ctx.device)
        self.skipped: set[str] = set()

    def _data(self) -> tuple[LabeledImages, LabeledImages]:
        c = self.config
        columns = dict(path_column=c.path_column, label_column=c.label_column)
        images = read_dataset(c.data, **columns)
        if c.val_data:
            val = read_dataset(c.val_data, class_names=images.class_names, **columns)
            return images, val
        return stratified_split(images, c.val_fraction, c.seed)

    def _image_size(self, base: Module) -> tuple[int, int]:
        card, requested = base.card, self.config.image_size
        if requested is None:
            return card.input_size
        if not card.variable_input_size and (requested, requested) != card.input_size:
            h, w = card.input_size
            raise ValueError(f"{card.handle} takes {h}x{w} images only; drop --image-size")
        return requested, requested

    def run(self, on_epoch_end: Callable[[dict[str, Any]], None] | None) -> RunResult:
        c, ctx = self.config, self.ctx
        state = open_run(c)
        barrier(ctx)
        train, val = self._data()
        self.train_images, self.val_images = train, val
        classes = train.class_names
        if state and state["epoch"] >= c.epochs and (self.run_dir / MODEL).is_file():
            if ctx.is_main:
                log.info("%s is complete (%d epochs)", self.run_dir, state["epoch"])
            return RunResult(self.run_dir, self.run_dir / MODEL, classes, state["metrics"])
        torch.manual_seed(c.seed + ctx.rank)  # the head's init; masks use self.rng
        self.rng = TrainingRNG(c.seed + ctx.rank, ctx.device)
        base = load_base(c.model, c.pretrained)
        size = self._image_size(base)
        task_type = HeadTask if c.mode == "head" else FullTask
        task = task_type(c, ctx, base, train, val, size, self.autocast)
        if ctx.is_main:  # only now: a start that fails before this leaves no run behind
            record_job(c)
        optimizer = _optimizer(task.model, c)
        steps = task.steps_per_epoch
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, _schedule(c.epochs * steps, round(c.warmup_epochs * steps)))
        scaler = torch.amp.GradScaler(ctx.device.type, enabled=self.precision == "float16")
        history: list[dict[str, Any]] = []
        start = 0
        if state:
            task.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            history, start = list(state["metrics"]), state["epoch"]
            self.skipped = set(state.get("skipped", []))
            self._restore_rng(state["rng"], start)
            if ctx.is_main:
                log.info("resuming %s after epoch %d", self.run_dir, start)
        summary = dict(model=c.model, mode=c.mode, data=c.data, classes=list(classes),
                       train_examples=len(train), val_examples=len(val), image_size=list(size),
                       title=f"{c.mode} fine-tuning of {base.card.short_name} on "
                             f"{Path(c.data).name} ({len(classes)} classes)")
        for epoch in range(start, c.epochs):
            began = time.perf_counter()
            task.train(True)
            train_loss, train_acc = self._pass(task, epoch, optimizer, scheduler, scaler)
            task.sync_buffers()
            task.train(False)
            val_loss, val_acc = self._pass(task, None) if len(val) else (None, None)
            row = dict(epoch=epoch + 1, train_loss=train_loss, train_accuracy=train_acc,
                       val_loss=val_loss, val_accuracy=val_acc, lr=scheduler.get_last_lr()[0],
                       seconds=round(time.perf_counter() - began, 3))
            history.append(row)
            self._checkpoint(task, optimizer, scheduler, scaler, history, summary)
            if ctx.is_main:
                log.info("epoch %d/%d  train loss %.4f acc %.3f  val loss %s acc %s  %.1f s",
                         epoch + 1, c.epochs, train_loss, train_acc, _fmt(val_loss),
                         _fmt(val_acc), row["seconds"])
            if on_epoch_end:
                on_epoch_end(row)
        if ctx.is_main:
            extra = dict(mode=c.mode, epochs=c.epochs, data=c.data, metrics=history[-1])
            save_classifier(task.final_net(), base, self.run_dir / MODEL, list(classes), size,
                            extra)
        barrier(ctx)
        return RunResult(self.run_dir, self.run_dir / MODEL, classes, history)

    def _pass(self, task: HeadTask | FullTask, epoch: int | None,
              optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
              scaler: torch.amp.GradScaler | None = None) -> tuple[float, float]:
        """One training epoch (``epoch`` given) or one validation pass: (loss, accuracy)
        over every process's examples; undecodable images (label -1) do not count."""
        training = epoch is not None
        criterion = nn.CrossEntropyLoss(ignore_index=-1, reduction="sum",
                                        label_smoothing=self.config.label_smoothing)
        model = task.model if training else task.eval_model
        totals = torch.zeros(3, dtype=torch.float64, device=self.ctx.device)
        batches = task.train_batches(epoch) if training else task.val_batches()
        with torch.set_grad_enabled(training):
            for inputs, labels, indices in batches:
                labels = labels.to(self.ctx.device, non_blocking=True)
                valid = labels >= 0
                if not bool(valid.all()):
                    images = self.train_images if training else self.val_images
                    self.skipped.update(images.paths[i] for i in indices[~valid.cpu()].tolist())
                # the step's dropout / drop-path masks (forward and any recomputation in
                # backward) come from the training RNG only
                with self.rng.active() if training else nullcontext():
                    with self.autocast():
                        logits = task.logits(model, inputs)
                    loss_sum = criterion(logits.float(), labels)
                    count = valid.sum()
                    if training:
                        loss = loss_sum / count.clamp(min=1)
                        optimizer.zero_grad(set_to_none=True)
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                        scheduler.step()
                correct = ((logits.argmax(1) == labels) & valid).sum()
                totals += torch.stack([loss_sum.detach().double(), correct.double(),
                                       count.double()])
        loss_sum, correct, count = sum_all(totals.tolist(), self.ctx)
        if count == 0:
            return float("nan"), float("nan")
        return loss_sum / count, correct / count

    def _restore_rng(self, states: list[dict[str, Any]], start: int) -> None:
        if len(states) == self.ctx.world_size:
            self.rng.load_state_dict(states[self.ctx.rank])
            return
        log.warning("the run was checkpointed with %d processes, now %d: it continues, but "
                    "dropout masks differ from an uninterrupted run", len(states),
                    self.ctx.world_size)
        self.rng = TrainingRNG(self.config.seed + 1000 * start + self.ctx.rank, self.ctx.device)

    def _checkpoint(self, task: HeadTask | FullTask, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: torch.amp.GradScaler, history: list[dict[str, Any]],
                    summary: dict[str, Any]) -> None:
        rng = all_gather_objects(self.rng.state_dict(), self.ctx)
        skipped = set().union(*all_gather_objects(sorted(self.skipped), self.ctx))
        self.skipped = skipped
        if self.ctx.is_main:
            save_checkpoint(self.run_dir / CHECKPOINT, dict(
                epoch=history[-1]["epoch"], model=task.state_dict(),
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict(), rng=rng, metrics=history, skipped=sorted(skipped)))
            paths = sorted(skipped)
            if paths:
                atomic_write_text(self.run_dir / "skipped_images.txt", "\n".join(paths) + "\n")
            write_metrics(self.run_dir, history, {**summary, "skipped_images": len(paths)})
        barrier(self.ctx)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"

