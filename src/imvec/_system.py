"""Process-wide settings of the machine imvec runs on: the C allocator."""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["auto_tune_allocator", "trim_allocator", "tune_allocator"]

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
