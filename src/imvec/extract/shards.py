"""A sharded output dataset: Parquet shards written where they are computed, done markers.

``features/`` holds ``shard-00000.parquet``, ``shard-00001.parquet``, ... (shard k = the
images ``k * shard_size`` to ``(k + 1) * shard_size - 1`` of the listing, see
:mod:`imvec.extract.manifest`), and beside them, in names starting with ``_`` or ``.`` that
Parquet readers skip: ``_imvec.json`` (the job), ``_manifest/`` (the listing),
``_done/00000.json`` (one marker per finished shard), ``_errors.csv``.

:func:`write_shard` is the one writer, usable from any process that computed a shard (the
local engine's main process, a Ray actor): the shard file is renamed into place complete,
then its marker is; a shard without a marker is computed again, so a crash at any moment
leaves every image either done once or to do.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from imvec._io import atomic_path, atomic_write_text
from imvec.errors import ImvecError
from imvec.extract.arrow import list_values, read_columns
from imvec.extract.fingerprint import Fingerprints
from imvec.extract.table import METADATA_KEY, ids_of, output_schema, output_table

__all__ = ["DONE", "JOB", "dataset_record", "done_marker", "inputs_sha256", "is_dataset",
           "read_dataset", "read_marker", "shard_path", "write_shard"]

JOB = "_imvec.json"
DONE = "_done"
ERRORS = "_errors.csv"


def is_dataset(output: str | os.PathLike) -> bool:
    """An output without a ``.parquet`` / ``.npy`` suffix names a folder of shards."""
    return Path(output).suffix.lower() not in (".parquet", ".npy")


def shard_path(output_dir: str | os.PathLike, index: int) -> Path:
    return Path(output_dir) / f"shard-{index:05d}.parquet"


def done_marker(output_dir: str | os.PathLike, index: int) -> Path:
    return Path(output_dir) / DONE / f"{index:05d}.json"


def inputs_sha256(ids: Sequence[str], prints: Fingerprints) -> str:
    """One digest of a shard's inputs (ids, sizes, mtimes): equal means nothing changed."""
    digest = hashlib.sha256()
    for ident, size, mtime in zip(ids, prints.size.tolist(), prints.mtime_ns.tolist(),
                                  strict=True):
        digest.update(f"{ident}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def write_shard(output_dir: str | os.PathLike, shard_index: int, ids: Sequence[str],
                vectors: np.ndarray, metadata: dict, *, paths: Sequence[str] | None = None,
                fingerprints: Fingerprints | None = None,
                failures: Sequence[dict] = ()) -> Path:
    """Write shard ``shard_index`` (its ok rows; ``failures``: one dict per failed image with
    id, path, reason, file_size, file_mtime_ns, file_hash) atomically, then its done marker.

    ``metadata``: the job's provenance record (:func:`provenance.describe`), plus optional
    ``"shard"`` entries (e.g. ``inputs_sha256``) stored as the shard's own provenance.
    Returns the shard's path. Safe to call again for the same shard (it replaces both)."""
    output_dir = Path(output_dir)
    vectors = np.asarray(vectors, np.float32).reshape(len(ids), -1)
    record = {k: v for k, v in metadata.items() if k != "shard"}
    shard = {"index": shard_index, "rows": len(ids), "failed": len(failures),
             **metadata.get("shard", {})}
    prints = fingerprints or Fingerprints.from_rows([(-1, -1, None)] * len(ids))
    schema = output_schema(record["model"]["num_features"], record)
    schema = schema.with_metadata({**schema.metadata,
                                   METADATA_KEY + b".shard": json.dumps(shard).encode()})
    table = output_table(ids, paths or ids, vectors, prints, schema)
    path = shard_path(output_dir, shard_index)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, use_dictionary=False)  # by path (see arrow.read_columns)
    marker = done_marker(output_dir, shard_index)
    marker.parent.mkdir(exist_ok=True)
    body = {**shard, "weights_sha256": record["model"]["weights_sha256"],
            "failures": list(failures)}
    # ASCII JSON escapes the lone surrogates of names that are not UTF-8: read back exactly
    atomic_write_text(marker, json.dumps(body, sort_keys=True, ensure_ascii=True))
    return path


def read_marker(output_dir: str | os.PathLike, index: int) -> dict | None:
    """The done marker of a shard, or None (not done, or a marker a crash left torn)."""
    try:
        return json.loads(done_marker(output_dir, index).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def dataset_record(output_dir: str | os.PathLike) -> dict:
    """The provenance record of an output folder."""
    try:
        return json.loads((Path(output_dir) / JOB).read_text())["record"]
    except (OSError, ValueError, KeyError) as exc:
        raise ImvecError(f"{output_dir} is not an imvec output folder (no readable {JOB}: "
                         f"{exc})") from exc


def read_dataset(output_dir: str | os.PathLike) -> tuple[list[str], np.ndarray]:
    """``(ids, features)`` of the done shards of an output folder, in listing order."""
    dataset_record(output_dir)
    shards = json.loads((Path(output_dir) / JOB).read_text())["shards"]
    ids: list[str] = []
    parts = []
    for index in range(shards):
        if read_marker(output_dir, index) is None:
            continue
        table = read_columns(shard_path(output_dir, index), ["id", "id_bytes", "feature"])
        ids.extend(ids_of(table))
        parts.append(list_values(table.column("feature")))
    dim = dataset_record(output_dir)["model"]["num_features"]
    return ids, np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
