"""Arrow arrays to and from numpy through their buffers, and Parquet columns read simply.

``pyarrow.array(...)``, ``Array.to_numpy()`` and ``pq.read_table`` import pandas on first
use (0.2 s here), a measurable part of a short job; these helpers never do, and copy each
value at most once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["decode_raw", "display", "fixed_size_lists", "list_values", "raw", "raw_only",
           "read_columns", "strings"]

# Names that are not UTF-8 (legal on Linux) reach Python as str with lone surrogates
# (os.listdir's surrogateescape); their exact bytes are kept in a binary column.
_FS = ("utf-8", "surrogateescape")


def display(value: str) -> str:
    """A name as valid UTF-8 text: undecodable bytes shown as ``\\xNN``."""
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode(*_FS).decode("utf-8", "backslashreplace")


def raw(values: Sequence[str]) -> pa.Array:
    """Names as their exact bytes (what the file system holds)."""
    return pa.array([v.encode(*_FS) for v in values], pa.binary())


def raw_only(values: Sequence[str]) -> pa.Array:
    """The exact bytes of the names that are not UTF-8, null for the others."""
    return pa.array([None if display(v) == v else v.encode(*_FS) for v in values], pa.binary())


def decode_raw(column: pa.Array | pa.ChunkedArray) -> list[str]:
    """Names from their exact bytes: the str ``os.listdir`` gives."""
    return [b.decode(*_FS) for b in column.to_pylist()]


def _validity(valid: np.ndarray) -> tuple[pa.Buffer | None, int]:
    nulls = int(len(valid) - valid.sum())
    if not nulls:
        return None, 0
    return pa.py_buffer(np.packbits(valid, bitorder="little")), nulls


def strings(values: Sequence[str | None]) -> pa.Array:
    """A string array; ``None`` becomes null; names that are not UTF-8 as :func:`display`."""
    encoded = [b"" if v is None else display(v).encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, np.int32)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    validity, nulls = _validity(np.array([v is not None for v in values], bool))
    return pa.Array.from_buffers(pa.string(), len(encoded), [
        validity, pa.py_buffer(offsets), pa.py_buffer(b"".join(encoded))], null_count=nulls)


def fixed_size_lists(values: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """``[N, D]`` float32 rows as ``fixed_size_list<float32>[D]``; rows where ``valid`` is
    False become null."""
    rows, dim = values.shape
    flat = np.ascontiguousarray(values, np.float32).reshape(-1)
    child = pa.Array.from_buffers(pa.float32(), rows * dim, [None, pa.py_buffer(flat)])
    validity, nulls = _validity(np.ones(rows, bool) if valid is None else np.asarray(valid))
    return pa.Array.from_buffers(pa.list_(pa.float32(), dim), rows, [validity],
                                 null_count=nulls, children=[child])


def list_values(column: pa.Array | pa.ChunkedArray, out: np.ndarray | None = None) -> np.ndarray:
    """The rows of a ``fixed_size_list<float32>[D]`` column as a new ``[N, D]`` array (the
    values under null rows are whatever the file holds)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    dim = column.type.list_size
    rows = sum(len(c) for c in chunks)
    out = np.empty((rows, dim), np.float32) if out is None else out
    at = 0
    for chunk in chunks:
        child = chunk.values
        flat = np.frombuffer(child.buffers()[1], np.float32, count=child.offset + len(child))
        start = child.offset + chunk.offset * dim
        out[at:at + len(chunk)] = flat[start:start + len(chunk) * dim].reshape(-1, dim)
        at += len(chunk)
    return out


def read_columns(path: str | os.PathLike, columns: list[str]) -> pa.Table:
    """Some columns of one Parquet file (the file is closed on return). Read by path, never
    through a Python file object: pyarrow's reader threads calling back into Python abort
    the process at exit once torch is loaded (SIGABRT in about half the runs)."""
    with pq.ParquetFile(os.fspath(path)) as parquet:
        return parquet.read(columns=columns)
