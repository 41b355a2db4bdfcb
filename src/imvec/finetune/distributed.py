"""Multi-process training with ``torch.distributed``: torchrun + DistributedDataParallel.

``torchrun --nproc_per_node=N`` (and ``--nnodes``/``--rdzv-*`` for several machines) sets
RANK / WORLD_SIZE / LOCAL_RANK; each process then drives one GPU (NCCL) or, without GPUs,
a CPU share (gloo). The batch size is global and split evenly over the processes, so a run
means the same thing on any number of them.

Batch norm: by default each process normalises with its own batch statistics, as the
original TPU training of these networks did per core; DDP's per-step buffer broadcast is
off and the moving averages are averaged over processes at the end of every epoch, so
each epoch's checkpoint holds statistics of all the data. ``sync_bn`` (CUDA only) uses
SyncBatchNorm, i.e. statistics over the global batch, at the cost of a sync per BN layer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from imvec._system import resolve_device

__all__ = ["Context", "all_gather_objects", "average_buffers", "barrier", "setup", "sum_all",
           "teardown", "wrap"]


@dataclass(frozen=True)
class Context:
    """This process's place in the run: rank, world size and device."""

    rank: int
    world_size: int
    device: torch.device
    owns_group: bool  # we initialised the process group, so we tear it down

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup(device: str | None = None) -> Context:
    """Join the process group that torchrun describes (if any) and pick this rank's device.

    An already initialised group (the caller's own) is used as it is. A device this machine
    cannot use is a :class:`~imvec.errors.DeviceError` before anything starts.
    """
    if device is not None:
        resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    owns = False
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    elif world > 1:
        use_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        if use_cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if use_cuda else "gloo")
        owns = True
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and world > 1:
        device = f"cuda:{local_rank}"
    rank = dist.get_rank() if world > 1 else 0
    return Context(rank, world, resolve_device(device), owns)


def teardown(ctx: Context) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def sum_all(values: list[float], ctx: Context) -> list[float]:
    """Element-wise sum over processes (metrics counts)."""
    if not ctx.distributed:
        return list(values)
    device = ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather_objects(obj: Any, ctx: Context) -> list[Any]:
    """Every process's ``obj``, in rank order (their RNG states, for a checkpoint)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def average_buffers(module: nn.Module, ctx: Context) -> None:
    """Average the BN moving statistics over processes (floating buffers only)."""
    if not ctx.distributed:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= ctx.world_size


def wrap(model: nn.Module, ctx: Context, sync_bn: bool = False) -> nn.Module:
    """DDP around ``model`` when distributed (else ``model`` itself)."""
    if sync_bn:
        if ctx.device.type != "cuda":
            raise ValueError("sync_bn needs CUDA (SyncBatchNorm has no CPU kernel); drop "
                             "--sync-bn to use per-process batch statistics")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if not ctx.distributed:
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
