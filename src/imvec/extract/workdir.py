"""The work folder of an unfinished job: committed parts that survive any crash.

``features.parquet`` is built in ``features.parquet.partial/``:

- ``job.json``: the provenance record (model, weights sha256, preprocessing). A rerun with
  a different record refuses to add to these parts.
- ``part-*.parquet``: committed rows (``id``, ``path``, ``feature``, ``error``), failures
  included so that they are not retried. Each part is written to ``*.tmp``, fsynced, then
  renamed, and the folder fsynced: after ``kill -9`` or a power loss a part is either
  complete or absent, never torn. Leftover ``*.tmp`` files are deleted on the next run.
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock, Timeout

from imvec.errors import ImvecError
from imvec.extract.arrow import fixed_size_lists, read_columns, strings
from imvec.extract.provenance import differences

__all__ = ["PartInfo", "ResumeError", "WorkDir", "fsync_dir", "part_schema", "work_dir_for"]

RECORD = "job.json"


class ResumeError(ImvecError, ValueError):
    """Unfinished work that this run cannot continue (other model or preprocessing)."""


def work_dir_for(output: Path) -> Path:
    return output.with_name(output.name + ".partial")


def part_schema(dim: int) -> pa.Schema:
    return pa.schema([("id", pa.string()), ("path", pa.string()),
                      ("feature", pa.list_(pa.float32(), dim)), ("error", pa.string())])


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_durably(path: Path, write) -> None:
    """``write(file)`` into ``path.tmp``, fsync, rename to ``path``, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


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
            write_durably(record_path, lambda f: f.write(text))
        self._scan()
        return self

    def _scan(self) -> None:
        for tmp in self.path.glob("*.tmp"):
            tmp.unlink(missing_ok=True)  # a write that a crash interrupted
        for part in sorted(self.path.glob("part-*.parquet")):
            try:
                table = read_columns(part, ["id"])
                if pq.read_schema(part).field("feature").type != self.schema.field("feature").type:
                    raise ValueError("feature size differs")
            except (OSError, ValueError, KeyError, pa.ArrowException) as exc:
                aside = part.with_name(part.name + ".unreadable")
                os.replace(part, aside)
                self.notes.append(f"set aside unreadable {part.name} ({exc}); its images "
                                  "are computed again")
                continue
            self.parts.append(PartInfo(part, table.num_rows))
            self.done.update(table.column("id").to_pylist())
        numbers = [int(p.path.stem.split("-")[1]) for p in self.parts
                   if p.path.stem.split("-")[1].isdigit()]
        self._counter = max(numbers, default=-1) + 1

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- committing --------------------------------------------------------------------
    def add(self, ids: Sequence[str], paths: Sequence[str], features: np.ndarray | None,
            errors: Sequence[str | None]) -> None:
        """Rows of one batch; ``features[i]`` is ignored where ``errors[i]`` is set."""
        self._buffer.append(make_part_table(ids, paths, features, errors, self.dim))
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
        self.done.update(table.column("id").to_pylist())
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
                    errors: Sequence[str | None], dim: int) -> pa.Table:
    n = len(ids)
    failed = np.array([e is not None for e in errors], dtype=bool)
    values = np.zeros((n, dim), np.float32) if features is None else np.asarray(
        features, dtype=np.float32).reshape(n, dim)
    return pa.table([strings(ids), strings(paths), fixed_size_lists(values, ~failed),
                     strings(errors)], schema=part_schema(dim))


def commit_table(table: pa.Table, path: Path, done: int = 0) -> None:
    """Write one part durably; a failure leaves no file and says what is kept."""
    try:
        write_durably(path, lambda f: pq.write_table(table, f, use_dictionary=False))
    except OSError as exc:
        raise disk_error(exc, f"part {path}",
                         f"{done} images committed earlier are kept in {path.parent}.") from exc
