"""Decode and resize in worker processes, batch by batch, straight into shared buffers.

Workers write each decoded image, scaled to the network's range, into its row of a batch
buffer (:class:`~imvec.extract.ring.BatchRing`), so the model reads batches in place. A
batch's chunks are spread over the workers; at most ``lookahead`` batches beyond the one
the caller holds are decoded ahead, so memory stays bounded whatever the collection size.
A bad image is a per-image error, never the end of the job; even a decoder that kills its
worker process only costs that image: the pool is restarted and the chunk retried one
image at a time to find the culprit.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from imvec.data.decode import ImageDecodeError
from imvec.data.preprocess import Preprocessing
from imvec.data.sources import Item
from imvec.extract.ring import BatchRing
from imvec._system import trim_allocator, tune_allocator
from imvec.engines.scaling import to_network_range

__all__ = ["Batch", "DecodePool", "decode_into", "default_workers"]

CRASHED = "the decoder crashed on this image (its worker process died)"
WORKER_KEEPS_BLOCKS_UP_TO = 32 << 20  # glibc's largest mmap threshold


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _reason(exc: Exception) -> str:
    if isinstance(exc, ImageDecodeError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"  # a decoder bug is still only this image's problem


def decode_into(preprocessing: Preprocessing, items: Sequence[Item],
                rows: np.ndarray) -> list[str | None]:
    """Decode ``items`` into ``rows`` (one each), scaled to the network's range as the
    module scales; a failure leaves its row as it was and becomes that image's reason."""
    errors: list[str | None] = []
    for row, item in zip(rows, items, strict=True):
        try:
            to_network_range(preprocessing(item.path), out=row)
            errors.append(None)
        except Exception as exc:  # noqa: BLE001
            errors.append(_reason(exc))
    return errors


@dataclass
class Batch:
    """Items of one batch, their reasons (None = decoded) and their network inputs.

    ``images`` are rows of a shared buffer, valid until the next batch is asked for; the
    row of a failed item holds meaningless (finite) values."""

    items: Sequence[Item]
    errors: list[str | None]
    images: np.ndarray  # [len(items), H, W, 3] float32 in the network's range


_RING: list[np.ndarray | None] = [None]  # a worker's view of the shared buffers


def _decode_chunk(preprocessing: Preprocessing, items: Sequence[Item], slot: int,
                  start: int) -> tuple[list[str | None], np.ndarray | None]:
    """Worker: decode ``items`` into rows ``start...`` of buffer ``slot``. Returns the
    reasons, and the rows themselves when the buffers are not shared with this process."""
    ring = _RING[0]
    rows = (ring[slot, start:start + len(items)] if ring is not None else
            np.zeros((len(items), *preprocessing.size, 3), np.float32))
    errors = decode_into(preprocessing, items, rows)
    _give_back_a_huge_images_memory()
    return errors, (None if ring is not None else rows)


_RSS_KEPT = [0]  # a worker's resident bytes after its start or its last trim


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return 0


def _give_back_a_huge_images_memory() -> None:
    """Trim the heap when the worker grew by more than it keeps on purpose: a huge image's
    buffers may come from free heap chunks (a forked worker inherits its parent's, e.g.
    after a pool restart) instead of fresh mappings, and would stay resident when freed."""
    resident = _resident_bytes()
    if resident > _RSS_KEPT[0] + 2 * WORKER_KEEPS_BLOCKS_UP_TO:
        trim_allocator()
        _RSS_KEPT[0] = _resident_bytes()


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


def _init_worker(parent: int, ring: np.ndarray | None) -> None:
    _die_with_parent(parent)
    _RING[0] = ring
    # Every image allocates the same few 0.1-2 MB arrays; glibc's default would hand them
    # back to the kernel and fault them in again each time (decoding ran up to 2x slower).
    # Huge images' buffers still go back at once.
    tune_allocator(True, largest=WORKER_KEEPS_BLOCKS_UP_TO)
    _RSS_KEPT[0] = _resident_bytes()
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


@dataclass
class _Chunk:
    slot: int
    start: int
    items: Sequence[Item]
    future: Future


class DecodePool:
    """Ordered, bounded, crash-tolerant decoding of batches into shared buffers.

    ``lookahead``: batches decoded ahead of the one the caller holds (0: decoding waits
    while the caller runs the model, i.e. they take turns). ``chunk``: images per task
    (default: about four tasks per worker per batch, so no worker idles long at the end
    of a batch). ``shared``: workers write into shared memory (default: where they are
    forked, i.e. on Linux).
    """

    def __init__(self, preprocessing: Preprocessing, workers: int, batch_size: int,
                 lookahead: int = 0, chunk: int | None = None,
                 shared: bool | None = None) -> None:
        self.preprocessing, self.workers, self.lookahead = preprocessing, workers, lookahead
        self.batch_size = batch_size
        self.chunk = chunk or max(1, -(-batch_size // (4 * workers)))
        if shared is None:
            shared = _context().get_start_method() == "fork"
        self.ring = BatchRing(lookahead + 1, batch_size, preprocessing.size, shared)
        self._executor: ProcessPoolExecutor | None = None
        self._pending: deque[_Chunk] = deque()  # submitted, not yet collected, in order
        self.restarts = 0

    def __enter__(self) -> DecodePool:
        self._start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        ring = self.ring.array if self.ring.shared else None
        self._executor = ProcessPoolExecutor(self.workers, mp_context=_context(),
                                             initializer=_init_worker,
                                             initargs=(os.getpid(), ring))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def _restart(self) -> None:
        self.restarts += 1
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._start()

    def _resubmit_pending(self) -> None:
        for chunk in self._pending:  # finished ones keep their result
            if not chunk.future.done() or chunk.future.exception() is not None:
                chunk.future = self._submit(chunk.items, chunk.slot, chunk.start)

    def _submit(self, items: Sequence[Item], slot: int, start: int) -> Future:
        return self._executor.submit(_decode_chunk, self.preprocessing, items, slot, start)

    def _decode_later(self, items: Sequence[Item], slot: int) -> list[_Chunk]:
        chunks = [_Chunk(slot, start, items[start:start + self.chunk],
                         self._submit(items[start:start + self.chunk], slot, start))
                  for start in range(0, len(items), self.chunk)]
        self._pending.extend(chunks)
        return chunks

    def batches(self, items: Sequence[Item]) -> Iterator[Batch]:
        """``items`` in batches of ``batch_size``, in order, decoded."""
        groups = (items[i:i + self.batch_size] for i in range(0, len(items), self.batch_size))
        ahead: deque[tuple[Sequence[Item], int, list[_Chunk]]] = deque()
        for index, group in enumerate(groups):
            slot = index % self.ring.slots  # free: its last batch was handed on before
            ahead.append((group, slot, self._decode_later(group, slot)))
            if len(ahead) > self.lookahead:
                yield self._collect(*ahead.popleft())
        while ahead:
            yield self._collect(*ahead.popleft())

    def _collect(self, group: Sequence[Item], slot: int, chunks: list[_Chunk]) -> Batch:
        errors: list[str | None] = []
        for chunk in chunks:
            self._pending.popleft()
            try:
                reasons, rows = chunk.future.result()
            except BrokenProcessPool:
                # The chunk's images run one at a time, alone in a fresh pool, so a crash
                # is that image's own and not one of the other chunks'; those follow.
                self._restart()
                reasons, rows = self._one_by_one(chunk)
                self._resubmit_pending()
            if rows is not None:
                self.ring.array[slot, chunk.start:chunk.start + len(rows)] = rows
            errors.extend(reasons)
        return Batch(group, errors, self.ring.array[slot, :len(group)])

    def _one_by_one(self, chunk: _Chunk) -> tuple[list[str | None], np.ndarray | None]:
        reasons, parts = [], []
        for offset, item in enumerate(chunk.items):
            try:
                reason, rows = self._submit([item], chunk.slot, chunk.start + offset).result()
            except BrokenProcessPool:
                self._restart()
                reason, rows = [CRASHED], np.zeros((1, *self.preprocessing.size, 3),
                                                   np.float32)
            reasons.extend(reason)
            parts.append(rows)
        if self.ring.shared:
            return reasons, None
        return reasons, np.concatenate(parts)
