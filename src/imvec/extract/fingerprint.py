"""What identifies an input file's content cheaply: its size and mtime (nanoseconds), and
with ``verify_inputs`` a blake2b digest of its bytes.

A fingerprint is taken *before* the image is read, so a file rewritten while (or after) it
is computed shows a fingerprint other than the one recorded, and the next run recomputes
it. An unreadable or missing file gets size -1; a non-regular file (a FIFO) is never opened.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

__all__ = ["FINGERPRINT_FIELDS", "Fingerprints", "fingerprints", "same"]

HASH_CHUNK = 1 << 20
FINGERPRINT_FIELDS = [pa.field("file_size", pa.int64()), pa.field("file_mtime_ns", pa.int64()),
                      pa.field("file_hash", pa.string())]


@dataclass
class Fingerprints:
    """Column-wise fingerprints of a list of files (row i = file i)."""

    size: np.ndarray  # int64, -1 where the file could not be seen
    mtime_ns: np.ndarray  # int64
    hash: list[str | None]

    def row(self, i: int) -> tuple[int, int, str | None]:
        return int(self.size[i]), int(self.mtime_ns[i]), self.hash[i]

    def rows(self) -> list[tuple[int, int, str | None]]:
        return list(zip(self.size.tolist(), self.mtime_ns.tolist(), self.hash, strict=True))

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[int, int, str | None]]) -> Fingerprints:
        return cls(np.array([r[0] for r in rows], np.int64),
                   np.array([r[1] for r in rows], np.int64), [r[2] for r in rows])

    def arrays(self) -> list[pa.Array]:
        """``file_size``, ``file_mtime_ns``, ``file_hash`` columns."""
        return [pa.array(self.size, pa.int64()), pa.array(self.mtime_ns, pa.int64()),
                pa.array(self.hash, pa.string())]


def _digest(path: str) -> str | None:
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def fingerprints(paths: Sequence[str], verify_inputs: bool = False) -> Fingerprints:
    """Stat (and with ``verify_inputs`` hash) each path."""
    size = np.full(len(paths), -1, np.int64)
    mtime = np.full(len(paths), -1, np.int64)
    hashes: list[str | None] = [None] * len(paths)
    for i, path in enumerate(paths):
        try:
            info = os.stat(path)
        except (OSError, ValueError):
            continue
        size[i], mtime[i] = info.st_size, info.st_mtime_ns
        if verify_inputs and stat.S_ISREG(info.st_mode):
            hashes[i] = _digest(path)
    return Fingerprints(size, mtime, hashes)


def same(old: tuple[int, int, str | None], new: tuple[int, int, str | None]) -> bool:
    """Whether a file still has the content it had: by digest when both have one (a copy
    with a new mtime is the same file), else by size and mtime."""
    if old[0] != new[0]:
        return False
    if old[0] < 0:
        return True  # missing then, missing now: its failure stands
    if old[2] is not None and new[2] is not None:
        return old[2] == new[2]
    return old[1] == new[1]
