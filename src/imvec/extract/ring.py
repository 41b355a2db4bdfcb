"""Batch buffers the decoding workers write into directly, so images never cross a pipe.

Each batch of a job is decoded into one of a few preallocated buffers ``[batch, H, W, 3]``,
already in the network's range, and the model reads it in place: no pickling of the
10-20 MB a batch weighs, no concatenation, no separate scaling pass (that serial work
cost NASNet-mobile ~50 ms per batch of 32 on 2 cores). The memory is an anonymous shared
mapping, which worker processes started by fork inherit; where workers are not forked,
the buffers are private and the workers' images are copied in by the main process.
Beside them, :class:`RowClocks` says since when each row's image has been decoding.
"""

from __future__ import annotations

import mmap

import numpy as np

__all__ = ["BatchRing", "RowClocks"]


class BatchRing:
    """``slots`` buffers of ``batch`` images of ``size`` (height, width), float32."""

    def __init__(self, slots: int, batch: int, size: tuple[int, int], shared: bool) -> None:
        shape = (slots, batch, *size, 3)
        nbytes = int(np.prod(shape)) * 4
        # Anonymous mmap is MAP_SHARED: a forked child writes to the same pages.
        self._memory = mmap.mmap(-1, max(nbytes, 1)) if shared else bytearray(nbytes)
        self.shared = shared
        self.array = np.frombuffer(self._memory, np.float32, int(np.prod(shape))).reshape(shape)

    @property
    def slots(self) -> int:
        return self.array.shape[0]


class RowClocks:
    """For each row of the ring, when its image started decoding (``time.monotonic()``,
    0.0 while none is) and in which process: how the main process finds, and ends, a
    worker stuck on one image. Shared with the workers (inherited, or passed at spawn)."""

    def __init__(self, slots: int, batch: int, context) -> None:
        self._shape = (slots, batch)
        self._raw = (context.RawArray("d", slots * batch), context.RawArray("q", slots * batch))
        self._view()

    def _view(self) -> None:
        self.started = np.frombuffer(self._raw[0], np.float64).reshape(self._shape)
        self.pids = np.frombuffer(self._raw[1], np.int64).reshape(self._shape)

    def __getstate__(self) -> dict:
        return {"_shape": self._shape, "_raw": self._raw}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._view()
