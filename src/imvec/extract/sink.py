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

from imvec.data.remote import local_path
from imvec.data.sources import Item
from imvec.errors import ImvecError
from imvec.extract.arrow import (
    decode_raw,
    list_values,
    read_columns,
)
from imvec.extract.fingerprint import FINGERPRINT_FIELDS, Fingerprints
from imvec.extract.folder import is_remote
from imvec.extract.shards import dataset_record, read_dataset
from imvec.extract.table import METADATA_KEY, ids_of, output_schema, output_table
from imvec.extract.workdir import PartInfo, disk_error, write_durably

__all__ = ["OutputPaths", "assemble", "read_features", "read_ids", "read_metadata",
           "recorded_inputs"]

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
    """For each listed item, the part and row holding it, its input's fingerprint, and its
    error if it failed."""

    part: np.ndarray
    row: np.ndarray
    prints: Fingerprints
    errors: dict[int, str]
    missing: int


def _plan(items: Sequence[Item], parts: Sequence[PartInfo]) -> _Plan:
    """Later parts win: an image recomputed because its file changed replaces its old row."""
    position = {item.id: i for i, item in enumerate(items)}
    part = np.full(len(items), -1, np.int32)
    row = np.zeros(len(items), np.int64)
    prints = Fingerprints.from_rows([(-1, -1, None)] * len(items))
    errors: dict[int, str] = {}
    for k, info in enumerate(parts):
        table = read_columns(info.path, ["id", "error", "file_size", "file_mtime_ns",
                                         "file_hash"])
        seq = np.array([position.get(i, -1) for i in decode_raw(table.column("id"))], np.int64)
        rows = np.arange(len(seq))
        fresh = seq >= 0
        seq, rows = seq[fresh], rows[fresh]
        seq, first = np.unique(seq, return_index=True)  # repeated in one part: first row wins
        rows = rows[first]
        part[seq], row[seq] = k, rows
        prints.size[seq] = table.column("file_size").to_numpy()[rows]
        prints.mtime_ns[seq] = table.column("file_mtime_ns").to_numpy()[rows]
        hashes, reasons = table.column("file_hash").to_pylist(), table.column("error")
        reasons = reasons.to_pylist() if reasons.null_count < len(reasons) else None
        for s, r in zip(seq.tolist(), rows.tolist(), strict=True):
            prints.hash[s] = hashes[r]
            errors.pop(s, None)
            if reasons is not None and reasons[r] is not None:
                errors[s] = reasons[r]
    return _Plan(part, row, prints, errors, int((part < 0).sum()))


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
        errors_csv = _errors_csv(items, plan)
        write_durably(paths.errors, lambda tmp: tmp.write_bytes(errors_csv))
        if fmt == "npy":
            ids_csv = _ids_csv(items, plan, ok_seq)
            write_durably(paths.ids, lambda tmp: tmp.write_bytes(ids_csv))
            text = json.dumps(record, indent=1, sort_keys=True).encode()
            write_durably(paths.metadata, lambda tmp: tmp.write_bytes(text))
            write_durably(paths.output, lambda tmp: _write_npy(tmp, plan, ok_seq, parts, dim))
        else:
            write_durably(paths.output, lambda tmp: _write_parquet(tmp, items, plan, ok_seq,
                                                                   parts, dim, record))
    except OSError as exc:
        raise disk_error(exc, str(paths.output), kept) from exc
    return len(ok_seq), len(plan.errors)


PRINT_COLUMNS = [f.name for f in FINGERPRINT_FIELDS]


def _errors_csv(items: Sequence[Item], plan: _Plan) -> bytes:
    """path, reason and the file's fingerprint (a fixed file is noticed) per failed image;
    a name that is not UTF-8 is written as its exact bytes (read back with surrogateescape)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "reason", *PRINT_COLUMNS])
    for seq in sorted(plan.errors):
        writer.writerow([items[seq].path, plan.errors[seq], *_cells(plan, seq)])
    return text.getvalue().encode("utf-8", "surrogateescape")


def _cells(plan: _Plan, seq: int) -> list:
    size, mtime, digest = plan.prints.row(seq)
    return [size, mtime, digest or ""]


def _ids_csv(items: Sequence[Item], plan: _Plan, ok_seq: np.ndarray) -> bytes:
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["id", "path", *PRINT_COLUMNS])
    for seq in ok_seq.tolist():
        writer.writerow([items[seq].id, items[seq].path, *_cells(plan, seq)])
    return text.getvalue().encode("utf-8", "surrogateescape")


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


def _write_parquet(path, items, plan, ok_seq, parts, dim, record) -> None:
    schema = output_schema(dim, record)
    with pq.ParquetWriter(path, schema, use_dictionary=False) as writer:
        for seq, values in _chunks(plan, ok_seq, parts, dim):
            chosen = [items[s] for s in seq.tolist()]
            prints = Fingerprints(plan.prints.size[seq], plan.prints.mtime_ns[seq],
                                  [plan.prints.hash[s] for s in seq.tolist()])
            writer.write_table(output_table([i.id for i in chosen], [i.path for i in chosen],
                                            values, prints, schema), row_group_size=len(seq))
        if not len(ok_seq):
            writer.write_table(schema.empty_table())


def _write_npy(path, plan, ok_seq, parts, dim) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False,
              "shape": (len(ok_seq), dim)}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        for _, values in _chunks(plan, ok_seq, parts, dim):
            f.write(np.ascontiguousarray(values, "<f4").tobytes())


def read_metadata(path: str | os.PathLike) -> dict:
    """The provenance record of a result (model, weights sha256, preprocessing)."""
    if is_remote(path):
        return dataset_record(_remote_folder(path))
    path = _local(path)
    if path.is_dir():
        return dataset_record(path)
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


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return list(csv.reader(f))[1:]


def read_ids(path: str | os.PathLike) -> tuple[list[str], list[tuple[int, int, str | None]]]:
    """Ids and input fingerprints of a result, without reading its vectors."""
    path = Path(path)
    if path.suffix == ".npy":
        rows = _read_csv(OutputPaths.for_output(path, "npy").ids)
        return [r[0] for r in rows], [_print(r[2:]) for r in rows]
    columns = pq.read_schema(path).names
    if "file_size" not in columns:
        ids = ids_of(read_columns(path, ["id"]))
        return ids, [_print([])] * len(ids)
    table = read_columns(path, ["id", "id_bytes", "file_size", "file_mtime_ns", "file_hash"])
    return ids_of(table), list(zip(table.column("file_size").to_pylist(),
                                 table.column("file_mtime_ns").to_pylist(),
                                 table.column("file_hash").to_pylist(), strict=True))


def _print(cells: list[str]) -> tuple[int, int, str | None]:
    if len(cells) < 2:
        return (-2, -2, None)  # written before fingerprints were recorded: never the same
    return int(cells[0]), int(cells[1]), (cells[2] or None) if len(cells) > 2 else None


def recorded_inputs(paths: OutputPaths) -> dict[str, tuple[int, int, str | None]]:
    """Failed images of a finished result: path -> fingerprint."""
    if not paths.errors.is_file():
        return {}
    return {r[0]: _print(r[2:]) for r in _read_csv(paths.errors)}


def read_features(path: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """``(ids, features)`` of an ``imvec extract`` result: ids in row order, features
    ``[N, D]`` float32. Reads ``.parquet``, ``.npy`` (with its ``.ids.csv``) and output
    folders (their finished shards, in listing order), local or at a URL prefix."""
    if is_remote(path):
        return read_dataset(_remote_folder(path))
    path = _local(path)
    if path.is_dir():
        return read_dataset(path)
    if path.suffix == ".npy":
        return [r[0] for r in _read_csv(OutputPaths.for_output(path, "npy").ids)], np.load(path)
    columns = ["id", "id_bytes", "feature"]
    table = read_columns(path, [c for c in columns if c in pq.read_schema(path).names])
    return ids_of(table), list_values(table.column("feature"))


def _local(path: str | os.PathLike) -> Path:
    """A local path, or the one a ``file://`` URL names."""
    return Path(local_path(os.fspath(path)) or path)


def _remote_folder(url: str | os.PathLike) -> str:
    url = os.fspath(url)
    if Path(url).suffix.lower() in (".parquet", ".npy"):
        raise ImvecError(f"{url}: imvec reads output folders at URLs (s3://bucket/features/); "
                         "copy a single file locally to read it")
    return url
