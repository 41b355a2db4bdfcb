"""Process-wide settings of the machine imvec runs on: the C allocator, the device."""

from __future__ import annotations

import ctypes
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["auto_tune_allocator", "resolve_device", "trim_allocator", "tune_allocator"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc mallopt parameters
_ALLOCATOR_TUNED = [False]


def tune_allocator(enable: bool = True, largest: int | None = None) -> bool:
    """Keep freed activation memory in the process (glibc malloc) instead of returning it.

    glibc serves blocks above 32 MB with a fresh ``mmap`` and unmaps them on free, so every
    large activation (a batch-16 NASNet-large cell output is ~115 MB) is page-faulted in
    again on the next call; that cost 5-9x the copy itself for such tensors here. With
    mmap off and trimming raised, freed blocks are reused. The price: the process keeps
    its peak memory. Process-wide; a no-op off glibc. ``IMVEC_MALLOC_TUNING=0`` disables
    the automatic call made when the first fast engine is built.

    ``largest``: keep only blocks up to this many bytes (at most 32 MB); larger ones are
    mapped and unmapped as usual, so a process that rarely meets a huge array (a
    decoding worker, a 50-megapixel photo) does not hold on to it.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    if enable and largest:
        ok = (libc.mallopt(_M_MMAP_MAX, 65536) and libc.mallopt(_M_MMAP_THRESHOLD, largest)
              and libc.mallopt(_M_TRIM_THRESHOLD, 2 * largest))
    elif enable:
        ok = libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, 2**30)
    else:  # glibc's defaults
        ok = libc.mallopt(_M_MMAP_MAX, 65536) and libc.mallopt(_M_TRIM_THRESHOLD, 128 * 1024)
    _ALLOCATOR_TUNED[0] = bool(ok) and enable
    return bool(ok)


def trim_allocator() -> bool:
    """Hand all free heap memory back to the OS now (glibc ``malloc_trim``: also the free
    pages inside the heap, not only at its top). A no-op off glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return False


def auto_tune_allocator() -> None:
    if not _ALLOCATOR_TUNED[0] and os.environ.get("IMVEC_MALLOC_TUNING", "1") != "0":
        tune_allocator(True)


def resolve_device(name: str | None) -> torch.device:
    """The torch device ``name`` ("cpu", "cuda", "cuda:1", "mps"; None or "auto": CUDA where
    available, else the CPU), or a :class:`~imvec.errors.DeviceError` that says why it
    cannot be used here and what to use instead."""
    import torch  # deferred: decoding workers import this module and need no torch

    from imvec.errors import DeviceError

    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        hint = " (did you mean 'cuda'?)" if str(name).lower().startswith("gpu") else ""
        raise DeviceError(f"unknown device {name!r}{hint}; use cpu, cuda, cuda:N (N-th GPU) "
                          "or mps") from None
    if device.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise DeviceError(f"device {name!r}: this PyTorch build has no CUDA support "
                              f"(torch {torch.__version__}); install a CUDA build of PyTorch "
                              "(https://pytorch.org/get-started) or use --device cpu")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceError(f"device {name!r}: no CUDA GPU is visible (check the driver "
                              "with nvidia-smi and $CUDA_VISIBLE_DEVICES), or use --device cpu")
        if device.index is not None and device.index >= count:
            raise DeviceError(f"device {name!r}: this machine has {count} visible GPU(s), "
                              f"cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"device {name!r}: Apple's MPS backend is not available here; use "
                          "--device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"device {name!r}: imvec runs on cpu, cuda or mps")
    return device


def openmp_sleeps_when_idle() -> bool:
    """Before torch loads: OpenMP threads that wait spin only briefly, then sleep
    (``GOMP_SPINCOUNT=1000``, GNU OpenMP's own count for an oversubscribed machine; it
    reads it once, when torch loads it). Beside another job a spinning thread burns the
    core its preempted partner needs: NASNet ran 28-32 img/s with the default spin, 42-46
    with 1000 spins, 47 without spinning, and on a quiet machine 89-91, 85-87 and 77-82
    (benchmarks/results/pipeline.md). Left alone where the user chose a policy or torch is
    already loaded. Returns whether it was set."""
    chosen = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
    if "torch" in sys.modules or any(name in os.environ for name in chosen):
        return False
    os.environ["GOMP_SPINCOUNT"] = "1000"
    return True
