"""The finished output, assembled from committed parts, and how to read it back.

Rows come out in the listing order of the inputs, one per image, whatever order the parts
were computed in and however many runs it took; the row groups have a fixed size. So a
resumed job writes the same file as an uninterrupted one. The errors file and (for npy) the
ids and metadata files are renamed into place first and the main output last: once the
output exists, everything beside it is complete.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from imvec.data.sources import Item
from imvec.errors import ImvecError
from imvec.extract.arrow import fixed_size_lists, list_values, read_columns, strings
from imvec.extract.workdir import PartInfo, disk_error, write_durably

__all__ = ["OutputPaths", "assemble", "read_features", "read_metadata"]

METADATA_KEY = b"imvec"
ROW_GROUP_BYTES = 32 << 20
CACHE_BYTES = 512 << 20


@dataclass(frozen=True)
class OutputPaths:
    """The files of one result: ``features.parquet`` + ``features.errors.csv``; npy adds
    ``features.ids.csv`` (id, path per row) and ``features.json`` (the metadata)."""

    output: Path
    errors: Path
    ids: Path | None = None
    metadata: Path | None = None

    @classmethod
    def for_output(cls, output: str | os.PathLike, fmt: str) -> OutputPaths:
        output = Path(output)
        stem = output.with_suffix("")
        errors = stem.with_name(stem.name + ".errors.csv")
        if fmt == "npy":
            return cls(output, errors, stem.with_name(stem.name + ".ids.csv"),
                       stem.with_name(stem.name + ".json"))
        return cls(output, errors)


def row_group_rows(dim: int) -> int:
    return int(np.clip(ROW_GROUP_BYTES // (4 * dim), 256, 16384))


class _PartCache:
    """Feature arrays of parts, least recently used dropped beyond a byte budget."""

    def __init__(self, parts: Sequence[PartInfo], dim: int) -> None:
        self.parts, self.dim = parts, dim
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._bytes = 0

    def get(self, index: int) -> np.ndarray:
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        table = read_columns(self.parts[index].path, ["feature"])
        values = list_values(table.column(0))
        self._cache[index] = values
        self._bytes += values.nbytes
        while self._bytes > CACHE_BYTES and len(self._cache) > 1:
            _, dropped = self._cache.popitem(last=False)
            self._bytes -= dropped.nbytes
        return values


@dataclass
class _Plan:
    """For each listed item, the part and row holding it, and its error if it failed."""

    part: np.ndarray
    row: np.ndarray
    errors: dict[int, str]
    missing: int


def _plan(items: Sequence[Item], parts: Sequence[PartInfo]) -> _Plan:
    position = {item.id: i for i, item in enumerate(items)}
    part = np.full(len(items), -1, np.int32)
    row = np.zeros(len(items), np.int64)
    errors: dict[int, str] = {}
    for k, info in enumerate(parts):
        table = read_columns(info.path, ["id", "error"])
        seq = np.array([position.get(i, -1) for i in table.column("id").to_pylist()], np.int64)
        rows = np.arange(len(seq))
        fresh = seq >= 0
        seq, rows = seq[fresh], rows[fresh]
        seq, first = np.unique(seq, return_index=True)  # a repeated id: its first row wins
        rows = rows[first]
        new = part[seq] < 0
        seq, rows = seq[new], rows[new]
        part[seq], row[seq] = k, rows
        column = table.column("error")
        if column.null_count < len(column):  # some rows of this part failed
            reasons = column.to_pylist()
            errors.update((s, reasons[r]) for s, r in zip(seq.tolist(), rows.tolist(),
                                                          strict=True)
                          if reasons[r] is not None)
    return _Plan(part, row, errors, int((part < 0).sum()))


def assemble(items: Sequence[Item], parts: Sequence[PartInfo], record: dict, dim: int,
             paths: OutputPaths, fmt: str) -> tuple[int, int]:
    """Write the output files from the parts; returns (ok, failed)."""
    plan = _plan(items, parts)
    if plan.missing:
        raise ImvecError(f"{plan.missing} listed images have no committed result; rerun the "
                         "same command to compute them")
    failed = np.zeros(len(items), bool)
    failed[list(plan.errors)] = True
    ok_seq = np.nonzero(~failed)[0]
    kept = f"All {len(items)} results are kept in the work folder."
    try:
        write_durably(paths.errors, lambda f: f.write(_errors_csv(items, plan.errors)))
        if fmt == "npy":
            write_durably(paths.ids, lambda f: f.write(_ids_csv(items, ok_seq)))
            text = json.dumps(record, indent=1, sort_keys=True).encode()
            write_durably(paths.metadata, lambda f: f.write(text))
            write_durably(paths.output, lambda f: _write_npy(f, plan, ok_seq, parts, dim))
        else:
            write_durably(paths.output,
                          lambda f: _write_parquet(f, items, plan, ok_seq, parts, dim, record))
    except OSError as exc:
        raise disk_error(exc, str(paths.output), kept) from exc
    return len(ok_seq), len(plan.errors)


def _errors_csv(items: Sequence[Item], errors: dict[int, str]) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "reason"])
    for seq in sorted(errors):
        writer.writerow([items[seq].path, errors[seq]])
    return text.getvalue().encode()


def _ids_csv(items: Sequence[Item], ok_seq: np.ndarray) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["id", "path"])
    for seq in ok_seq.tolist():
        writer.writerow([items[seq].id, items[seq].path])
    return text.getvalue().encode()


def _chunks(plan: _Plan, ok_seq: np.ndarray, parts: Sequence[PartInfo], dim: int):
    """Feature arrays of the ok rows in listing order, a row group at a time."""
    cache = _PartCache(parts, dim)
    size = row_group_rows(dim)
    for start in range(0, len(ok_seq), size):
        seq = ok_seq[start:start + size]
        out = np.empty((len(seq), dim), np.float32)
        part, row = plan.part[seq], plan.row[seq]
        for k in np.unique(part):
            where = part == k
            out[where] = cache.get(int(k))[row[where]]
        yield seq, out


def _write_parquet(f, items, plan, ok_seq, parts, dim, record) -> None:
    schema = pa.schema(
        [pa.field("id", pa.string(), nullable=False), pa.field("path", pa.string(), False),
         pa.field("feature", pa.list_(pa.float32(), dim), False)],
        metadata={METADATA_KEY: json.dumps(record, sort_keys=True).encode(),
                  b"imvec.model": record["model"]["handle"].encode(),
                  b"imvec.weights_sha256": record["model"]["weights_sha256"].encode(),
                  b"imvec.preprocessing": json.dumps(record["preprocessing"]).encode()})
    with pq.ParquetWriter(f, schema, use_dictionary=False) as writer:
        for seq, values in _chunks(plan, ok_seq, parts, dim):
            chosen = [items[s] for s in seq.tolist()]
            writer.write_table(pa.table([strings([i.id for i in chosen]),
                                         strings([i.path for i in chosen]),
                                         fixed_size_lists(values)], schema=schema),
                               row_group_size=len(seq))
        if not len(ok_seq):
            writer.write_table(schema.empty_table())


def _write_npy(f, plan, ok_seq, parts, dim) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False,
              "shape": (len(ok_seq), dim)}
    np.lib.format.write_array_header_1_0(f, header)
    for _, values in _chunks(plan, ok_seq, parts, dim):
        f.write(np.ascontiguousarray(values, "<f4").tobytes())


def read_metadata(path: str | os.PathLike) -> dict:
    """The provenance record of a result (model, weights sha256, preprocessing)."""
    path = Path(path)
    if path.suffix == ".npy":
        meta = OutputPaths.for_output(path, "npy").metadata
        try:
            return json.loads(meta.read_text())
        except OSError as exc:
            raise ImvecError(f"{path}: its metadata file {meta} is missing ({exc})") from exc
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as exc:
        raise ImvecError(f"{path}: not a readable Parquet file ({exc})") from exc
    text = (schema.metadata or {}).get(METADATA_KEY)
    if text is None:
        raise ImvecError(f"{path} was not written by `imvec extract` (no imvec metadata)")
    return json.loads(text)


def read_features(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """``(ids, features)`` of an ``imvec extract`` result: ids in row order, features
    ``[N, D]`` float32. Reads ``.parquet`` and ``.npy`` (with its ``.ids.csv``)."""
    path = Path(path)
    if path.suffix == ".npy":
        ids_path = OutputPaths.for_output(path, "npy").ids
        with open(ids_path, newline="", encoding="utf-8") as f:
            ids = [row[0] for row in list(csv.reader(f))[1:]]
        return ids, np.load(path)
    table = read_columns(path, ["id", "feature"])
    return table.column("id").to_pylist(), list_values(table.column("feature"))
