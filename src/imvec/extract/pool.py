"""Decode and resize in worker processes, batch by batch, straight into shared buffers.

Workers write each decoded image, scaled to the network's range, into its row of a batch
buffer (:class:`~imvec.extract.ring.BatchRing`), so the model reads batches in place. A
batch's chunks are spread over the workers; at most ``lookahead`` batches beyond the one
the caller holds are decoded ahead, so memory stays bounded whatever the collection size.
A bad image is a per-image error, never the end of the job; even a decoder that kills its
worker process only costs that image: the pool is restarted and the chunk retried one
image at a time to find the culprit. A decoder stuck on one image longer than ``deadline``
seconds is ended the same way (its worker killed, the pool restarted), and that image
reported; the others are decoded again.
"""

from __future__ import annotations

import contextlib
import gc
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_for_any

import numpy as np

from imvec._system import trim_allocator, tune_allocator
from imvec.data.decode import DEFAULT_DECODE_TIMEOUT, ImageDecodeError, opencv
from imvec.data.preprocess import Preprocessing
from imvec.data.remote import image_source
from imvec.data.sources import Item
from imvec.engines.scaling import to_network_range
from imvec.engines.threads import decode_workers
from imvec.extract.ring import BatchRing, RowClocks

__all__ = ["DEFAULT_DECODE_TIMEOUT", "Batch", "DecodePool", "decode_into", "default_workers"]

CRASHED = "the decoder crashed on this image (its worker process died)"
WORKER_KEEPS_BLOCKS_UP_TO = 32 << 20  # glibc's largest mmap threshold


def default_workers(overlap: bool = False) -> int:
    """Decoding processes: one per CPU this process may use (affinity and cgroup quota),
    as the thread policy says (:func:`imvec.engines.threads.decode_workers`)."""
    return decode_workers(overlap)


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
            to_network_range(preprocessing(image_source(item.path)), out=row)
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
_CLOCKS: list[RowClocks | None] = [None]  # ... and of when each row's image started


def _decode_chunk(preprocessing: Preprocessing, items: Sequence[Item], slot: int,
                  start: int, settled: dict[int, str] | None = None,
                  ) -> tuple[list[str | None], np.ndarray | None]:
    """Worker: decode ``items`` into rows ``start...`` of buffer ``slot``, except those
    ``settled`` (offset -> reason, e.g. past the deadline before). Returns the reasons, and
    the rows themselves when the buffers are not shared with this process."""
    ring, clocks, settled = _RING[0], _CLOCKS[0], settled or {}
    rows = (ring[slot, start:start + len(items)] if ring is not None else
            np.zeros((len(items), *preprocessing.size, 3), np.float32))
    errors: list[str | None] = []
    for offset, item in enumerate(items):
        if offset in settled:
            errors.append(settled[offset])
            continue
        if clocks is not None:  # the pid first: the main process reads it once started is set
            clocks.pids[slot, start + offset] = os.getpid()
            clocks.started[slot, start + offset] = time.monotonic()
        errors.extend(decode_into(preprocessing, [item], rows[offset:offset + 1]))
        if clocks is not None:
            clocks.started[slot, start + offset] = 0.0
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


def _init_worker(parent: int, ring: np.ndarray | None, clocks: RowClocks | None) -> None:
    _die_with_parent(parent)
    _RING[0], _CLOCKS[0] = ring, clocks
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


_OPEN_POOLS: set[int] = set()  # pools of this process whose workers are being forked


def _leave_inherited_objects_alone() -> None:
    """In a worker just forked: the garbage collector never visits what the parent left.
    Collecting the parent's unreachable objects here ran their destructors without their
    threads: an ONNX Runtime session's thread pool blocked the worker forever."""
    if _OPEN_POOLS:
        gc.freeze()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_leave_inherited_objects_alone)


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
    """Ordered, bounded, crash- and hang-tolerant decoding of batches into shared buffers.

    ``lookahead``: batches decoded ahead of the one the caller holds (0: decoding waits
    while the caller runs the model, i.e. they take turns). ``chunk``: images per task
    (default: about four tasks per worker per batch, so no worker idles long at the end
    of a batch). ``shared``: workers write into shared memory (default: where they are
    forked, i.e. on Linux). ``deadline``: seconds one image may take to decode and resize
    (None: no limit); a worker past it is killed and replaced, the image reported.
    """

    def __init__(self, preprocessing: Preprocessing, workers: int, batch_size: int,
                 lookahead: int = 0, chunk: int | None = None,
                 shared: bool | None = None,
                 deadline: float | None = DEFAULT_DECODE_TIMEOUT) -> None:
        if deadline is not None and not deadline > 0:
            raise ValueError(f"the decode deadline must be a positive number of seconds (or "
                             f"None for none); got {deadline}")
        self.preprocessing, self.workers, self.lookahead = preprocessing, workers, lookahead
        self.batch_size, self.deadline = batch_size, deadline
        self.chunk = chunk or max(1, -(-batch_size // (4 * workers)))
        if shared is None:
            shared = _context().get_start_method() == "fork"
        self.ring = BatchRing(lookahead + 1, batch_size, preprocessing.size, shared)
        self.clocks = (RowClocks(self.ring.slots, batch_size, _context())
                       if deadline is not None else None)
        self._executor: ProcessPoolExecutor | None = None
        self._pending: deque[_Chunk] = deque()  # submitted, not yet collected, in order
        self._late: dict[tuple[int, int], str] = {}  # (slot, row) past the deadline -> reason
        self._killed = False  # since the last restart: a broken pool is then our doing
        self.restarts = 0

    def __enter__(self) -> DecodePool:
        self._start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        ring = self.ring.array if self.ring.shared else None
        if self.clocks is not None:
            self.clocks.started[:] = 0.0  # the last pool's images are no one's now
        self._killed = False
        # OpenCV loaded here, not in the forked workers: a dlopen after fork can deadlock on
        # the loader lock that another thread of this process held at the fork
        opencv()
        _OPEN_POOLS.add(id(self))
        self._executor = ProcessPoolExecutor(self.workers, mp_context=_context(),
                                             initializer=_init_worker,
                                             initargs=(os.getpid(), ring, self.clocks))

    def close(self) -> None:
        """Stops the workers; one stuck on an image gets ``deadline`` seconds, then is
        killed (a plain shutdown would wait for it forever)."""
        _OPEN_POOLS.discard(id(self))
        if self._executor is None:
            return
        if self.deadline is None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
            return
        running = {p.sentinel: p.pid for p in self._workers().values()}
        manager = getattr(self._executor, "_executor_manager_thread", None)
        self._executor.shutdown(wait=False, cancel_futures=True)
        end = time.monotonic() + self.deadline
        while running and (left := end - time.monotonic()) > 0:
            for sentinel in wait_for_any(list(running), left):
                running.pop(sentinel)
        for pid in running.values():
            with contextlib.suppress(OSError):  # not exited yet, so its pid is still its own
                os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))
        if manager is not None:
            manager.join()  # it joins the workers
        self._executor = None

    def _workers(self) -> dict:
        return dict(getattr(self._executor, "_processes", None) or {})

    def _restart(self) -> None:
        self.restarts += 1
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._start()

    def _settled(self, slot: int, start: int, count: int) -> dict[int, str]:
        return {row - start: reason for (s, row), reason in self._late.items()
                if s == slot and start <= row < start + count}

    def _resubmit_pending(self) -> None:
        for chunk in self._pending:  # finished ones keep their result
            if not chunk.future.done() or chunk.future.exception() is not None:
                chunk.future = self._submit(chunk.items, chunk.slot, chunk.start)

    def _submit(self, items: Sequence[Item], slot: int, start: int) -> Future:
        return self._executor.submit(_decode_chunk, self.preprocessing, items, slot, start,
                                     self._settled(slot, start, len(items)))

    def _decode_later(self, items: Sequence[Item], slot: int) -> list[_Chunk]:
        self._late = {key: r for key, r in self._late.items() if key[0] != slot}  # reused
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

    def _wait(self, future: Future) -> tuple[list[str | None], np.ndarray | None]:
        """``future``'s result; meanwhile any worker stuck on one image past the deadline
        is killed (the pool then breaks: BrokenProcessPool)."""
        if self.deadline is None:
            return future.result()
        while True:
            try:
                return future.result(timeout=min(1.0, self.deadline / 4))
            except FutureTimeout:
                self._end_late_decodes()

    def _end_late_decodes(self) -> None:
        started, now = self.clocks.started, time.monotonic()
        workers = self._workers()
        for slot, row in zip(*np.nonzero((started > 0) & (now - started > self.deadline)),
                             strict=True):
            pid = int(self.clocks.pids[slot, row])
            started[slot, row] = 0.0
            if workers and pid not in workers:
                continue  # written by a worker of a pool already replaced
            self._late[(int(slot), int(row))] = (
                f"decoding took longer than {self.deadline:g} s (the decode deadline; "
                "raise it with --decode-timeout)")
            self._killed = True
            with contextlib.suppress(OSError):
                os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))

    def _collect(self, group: Sequence[Item], slot: int, chunks: list[_Chunk]) -> Batch:
        errors: list[str | None] = []
        for chunk in chunks:
            self._pending.popleft()
            while True:
                try:
                    reasons, rows = self._wait(chunk.future)
                    break
                except BrokenProcessPool:
                    killed = self._killed
                    self._restart()
                    if killed:  # the culprits are known: everything else is decoded again
                        chunk.future = self._submit(chunk.items, chunk.slot, chunk.start)
                        self._resubmit_pending()
                        continue
                    # A crash: the chunk's images run one at a time, alone in a fresh pool,
                    # so a crash is that image's own and not one of the other chunks'.
                    reasons, rows = self._one_by_one(chunk)
                    self._resubmit_pending()
                    break
            if rows is not None:
                self.ring.array[slot, chunk.start:chunk.start + len(rows)] = rows
            errors.extend(reasons)
        return Batch(group, errors, self.ring.array[slot, :len(group)])

    def _one_by_one(self, chunk: _Chunk) -> tuple[list[str | None], np.ndarray | None]:
        reasons, parts = [], []
        for offset, item in enumerate(chunk.items):
            try:
                reason, rows = self._wait(self._submit([item], chunk.slot, chunk.start + offset))
            except BrokenProcessPool:
                self._restart()
                late = self._late.get((chunk.slot, chunk.start + offset))
                reason, rows = [late or CRASHED], np.zeros((1, *self.preprocessing.size, 3),
                                                           np.float32)
            reasons.extend(reason)
            parts.append(rows)
        if self.ring.shared:
            return reasons, None
        return reasons, np.concatenate(parts)
