"""Decode and resize in worker processes, in order, with a bounded number of chunks in flight.

At most ``2 * workers + 2`` chunks are decoded or waiting at any time, so memory stays
bounded whatever the collection size. A bad image is a per-image error, never the end of
the job; even a decoder that kills its worker process only costs that image: the pool is
restarted and the chunk retried one image at a time to find the culprit.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from imvec.data.decode import ImageDecodeError
from imvec.data.preprocess import Preprocessing
from imvec.data.sources import Item

__all__ = ["DecodePool", "Decoded", "decode_items", "default_workers"]

CRASHED = "the decoder crashed on this image (its worker process died)"


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass
class Decoded:
    """One chunk: images of the items that decoded (in order), reasons for the others."""

    items: Sequence[Item]
    images: np.ndarray  # [n_ok, H, W, 3] float32 in [0, 1]
    errors: list[str | None]  # per item; None = decoded


def decode_items(preprocessing: Preprocessing, items: Sequence[Item]) -> Decoded:
    """Decode a chunk in this process; every failure becomes that image's reason."""
    images, errors = [], []
    for item in items:
        try:
            images.append(preprocessing(item.path))
            errors.append(None)
        except ImageDecodeError as exc:
            errors.append(str(exc))
        except Exception as exc:  # any decoder bug is still only this image's problem
            errors.append(f"{type(exc).__name__}: {exc}")
    height, width = preprocessing.size
    stacked = np.stack(images) if images else np.empty((0, height, width, 3), np.float32)
    return Decoded(items, stacked, errors)


def _die_with_parent(parent: int) -> None:
    """A worker must not outlive a main process killed with SIGKILL (Linux: the kernel
    sends it SIGKILL too; elsewhere the pool's own shutdown applies)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _init_worker(parent: int) -> None:
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    try:
        import cv2

        cv2.setNumThreads(1)  # the pool already uses every core
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    except (ImportError, AttributeError):
        pass


def _context() -> multiprocessing.context.BaseContext:
    """fork where it is safe (Linux): workers start instantly and inherit imports;
    elsewhere the platform default."""
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


class DecodePool:
    """Ordered, bounded, crash-tolerant decoding of chunks of items."""

    def __init__(self, preprocessing: Preprocessing, workers: int) -> None:
        self.preprocessing, self.workers = preprocessing, workers
        self.max_in_flight = 2 * workers + 2
        self._executor: ProcessPoolExecutor | None = None
        self._pending: deque[tuple[Sequence[Item], Future]] = deque()
        self.restarts = 0

    def __enter__(self) -> DecodePool:
        self._start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        self._executor = ProcessPoolExecutor(self.workers, mp_context=_context(),
                                             initializer=_init_worker,
                                             initargs=(os.getpid(),))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def _restart(self) -> None:
        self.restarts += 1
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._start()
        self._pending = deque((c, self._submit(c)) for c, _ in self._pending)

    def _submit(self, items: Sequence[Item]) -> Future:
        return self._executor.submit(decode_items, self.preprocessing, items)

    def imap(self, chunks: Iterable[Sequence[Item]]) -> Iterator[Decoded]:
        """Decoded chunks in the order given, decoding ahead while the caller works."""
        for chunk in chunks:
            self._pending.append((chunk, self._submit(chunk)))
            if len(self._pending) >= self.max_in_flight:
                yield self._next()
        while self._pending:
            yield self._next()

    def _next(self) -> Decoded:
        chunk, future = self._pending.popleft()
        try:
            return future.result()
        except BrokenProcessPool:
            self._restart()
            return self._one_by_one(chunk)

    def _one_by_one(self, chunk: Sequence[Item]) -> Decoded:
        parts = []
        for item in chunk:
            try:
                parts.append(self._submit([item]).result())
            except BrokenProcessPool:
                self._restart()
                parts.append(Decoded([item], np.empty((0, *self.preprocessing.size, 3),
                                                      np.float32), [CRASHED]))
        return Decoded(chunk, np.concatenate([p.images for p in parts]),
                       [e for p in parts for e in p.errors])
