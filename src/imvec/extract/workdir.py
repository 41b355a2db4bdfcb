"""The work folder of an unfinished job: committed parts that survive any crash.

``features.parquet`` is built in ``features.parquet.partial/``:

- ``job.json``: the provenance record (model, weights sha256, preprocessing). A rerun with
  a different record refuses to add to these parts.
- ``part-*.parquet``: committed rows (``id`` and ``path`` as exact bytes, ``feature``,
  ``error``, and the input's fingerprint: ``file_size``, ``file_mtime_ns``, ``file_hash``),
  failures included so that they are not retried unless their file changes. Each part
  is written to a temporary file, fsynced, then renamed, and the folder fsynced: after
  ``kill -9`` or a power loss a part is either complete or absent, never torn. Leftover
  temporary files are deleted on the next run.
- ``.lock``: held while a process works here, released by the OS if it dies.

The finished output is assembled from the parts by :mod:`imvec.extract.sink`.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from imvec._io import atomic_path, fsync_dir
from imvec.errors import ImvecError
from imvec.extract.arrow import decode_raw, fixed_size_lists, raw, read_columns, strings
from imvec.extract.fingerprint import FINGERPRINT_FIELDS, Fingerprints
from imvec.extract.provenance import differences

__all__ = ["PartInfo", "ResumeError", "WorkDir", "part_schema", "work_dir_for"]

UNSEEN = (-1, -1, None)  # the fingerprint of an image nobody looked at

RECORD = "job.json"


class ResumeError(ImvecError, ValueError):
    """Unfinished work that this run cannot continue (other model or preprocessing)."""


def work_dir_for(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def part_schema(dim: int) -> pa.Schema:
    return pa.schema([("id", pa.binary()), ("path", pa.binary()),
                      ("feature", pa.list_(pa.float32(), dim)), ("error", pa.string()),
                      *FINGERPRINT_FIELDS])


def write_durably(path: Path, write: Callable[[Path], object]) -> None:
    """``write(temporary_path)``, then fsync and rename it to ``path`` (:mod:`imvec._io`).
    Writers get a path, never a Python file object (see :func:`arrow.read_columns`)."""
    with atomic_path(path) as tmp:
        write(tmp)


def disk_error(exc: OSError, what: str, kept: str) -> ImvecError:
    """The message for a failed write: what failed, what is safe, what to do."""
    reason = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else str(exc)
    return ImvecError(f"cannot write {what}: {reason}. {kept} Free space (or fix the "
                      "problem) and rerun the same command to continue.")


@dataclass
class PartInfo:
    """A committed part: its file and row count."""

    path: Path
    rows: int


class WorkDir:
    """Committed parts of one job plus the buffer of rows not yet committed."""

    def __init__(self, path: Path, record: dict, dim: int, commit_every: int = 1024,
                 commit_seconds: float = 60.0) -> None:
        self.path, self.record, self.dim = path, record, dim
        self.schema = part_schema(dim)
        self.commit_every, self.commit_seconds = commit_every, commit_seconds
        self.parts: list[PartInfo] = []
        self.done: set[str] = set()
        # id -> (file_size, file_mtime_ns, file_hash) as recorded by the latest part
        self.recorded: dict[str, tuple[int, int, str | None]] = {}
        # id -> fingerprint taken before its image is read, for the rows to come
        self.fingerprints: dict[str, tuple[int, int, str | None]] = {}
        self.notes: list[str] = []
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._last_commit = time.monotonic()
        self._counter = 0
        self._lock: FileLock | None = None

    # -- opening -----------------------------------------------------------------------
    def open(self, overwrite: bool = False) -> WorkDir:
        """Create or reopen the folder, take its lock, check the record, scan the parts."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ImvecError(f"cannot create the work folder {self.path}: {exc}") from exc
        self._lock = FileLock(str(self.path / ".lock"), timeout=0)
        try:
            self._lock.acquire()
        except Timeout as exc:
            raise ImvecError(f"another imvec process is writing {self.path} (its lock is "
                             "held); wait for it to finish or stop it") from exc
        if overwrite:
            for entry in self.path.iterdir():
                if entry.name != ".lock":
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        record_path = self.path / RECORD
        if record_path.is_file():
            old = json.loads(record_path.read_text())
            reasons = differences(old, self.record)
            if reasons:
                self.release()
                raise ResumeError(
                    f"{self.path} holds unfinished work made differently: "
                    f"{'; '.join(reasons)}. Rerun with the same model and options to "
                    "continue it, or pass --overwrite to discard it and start again")
        else:
            text = json.dumps(self.record, indent=1, sort_keys=True).encode()
            write_durably(record_path, lambda tmp: tmp.write_bytes(text))
        self._scan()
        return self

    def _scan(self) -> None:
        for tmp in self.path.glob("*.tmp"):
            tmp.unlink(missing_ok=True)  # a write that a crash interrupted
        for part in sorted(self.path.glob("part-*.parquet")):
            try:
                if pq.read_schema(part) != self.schema:
                    raise ValueError("its columns differ (another size or an older imvec)")
                table = read_columns(part, ["id", "file_size", "file_mtime_ns", "file_hash"])
            except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
                aside = part.with_name(part.name + ".unreadable")
                os.replace(part, aside)
                self.notes.append(f"set aside unreadable {part.name} ({exc}); its images "
                                  "are computed again")
                continue
            self.parts.append(PartInfo(part, table.num_rows))
            self._record(table)
        numbers = [int(p.path.stem.split("-")[1]) for p in self.parts
                   if p.path.stem.split("-")[1].isdigit()]
        self._counter = max(numbers, default=-1) + 1

    def _record(self, table: pa.Table) -> None:
        ids = decode_raw(table.column("id"))
        self.done.update(ids)
        self.recorded.update(zip(ids, zip(table.column("file_size").to_pylist(),
                                          table.column("file_mtime_ns").to_pylist(),
                                          table.column("file_hash").to_pylist(), strict=True),
                                 strict=True))

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- committing --------------------------------------------------------------------
    def add(self, ids: Sequence[str], paths: Sequence[str], features: np.ndarray | None,
            errors: Sequence[str | None]) -> None:
        """Rows of one batch; ``features[i]`` is ignored where ``errors[i]`` is set."""
        prints = [self.fingerprints.get(i, UNSEEN) for i in ids]
        self._buffer.append(make_part_table(ids, paths, features, errors, self.dim, prints))
        self._buffered += len(ids)
        if (self._buffered >= self.commit_every
                or time.monotonic() - self._last_commit >= self.commit_seconds):
            self.commit()

    def commit(self) -> None:
        """Write the buffered rows as one durable part."""
        if not self._buffered:
            return
        table = pa.concat_tables(self._buffer)
        path = self.path / f"part-{self._counter:06d}.parquet"
        commit_table(table, path, done=len(self.done))
        self._counter += 1
        self.parts.append(PartInfo(path, table.num_rows))
        self._record(table)
        self._buffer, self._buffered = [], 0
        self._last_commit = time.monotonic()

    def retire(self) -> None:
        """After the output is in place: remove the folder (renamed first, so a crash
        halfway through the deletion cannot leave something that looks like live work)."""
        trash = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.done")
        os.replace(self.path, trash)
        fsync_dir(self.path.parent)
        self.release()
        shutil.rmtree(trash, ignore_errors=True)


def make_part_table(ids: Sequence[str], paths: Sequence[str], features: np.ndarray | None,
                    errors: Sequence[str | None], dim: int,
                    prints: Sequence[tuple[int, int, str | None]] | None = None) -> pa.Table:
    n = len(ids)
    prints = Fingerprints.from_rows(prints or [UNSEEN] * n)
    failed = np.array([e is not None for e in errors], dtype=bool)
    values = np.zeros((n, dim), np.float32) if features is None else np.asarray(
        features, dtype=np.float32).reshape(n, dim)
    return pa.table([raw(ids), raw(paths), fixed_size_lists(values, ~failed), strings(errors),
                     *prints.arrays()], schema=part_schema(dim))


def commit_table(table: pa.Table, path: Path, done: int = 0) -> None:
    """Write one part durably; a failure leaves no file and says what is kept."""
    try:
        write_durably(path, lambda tmp: pq.write_table(table, tmp, use_dictionary=False))
    except OSError as exc:
        raise disk_error(exc, f"part {path}",
                         f"{done} images committed earlier are kept in {path.parent}.") from exc
