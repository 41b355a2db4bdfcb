"""A sharded output dataset: Parquet shards written where they are computed, done markers.

``features/`` holds ``shard-00000.parquet``, ``shard-00001.parquet``, ... (shard k = the
images ``k * shard_size`` to ``(k + 1) * shard_size - 1`` of the listing, see
:mod:`imvec.extract.manifest`), and beside them, in names starting with ``_`` or ``.`` that
Parquet readers skip: ``_imvec.json`` (the job), ``_manifest/`` (the listing),
``_done/00000.json`` (one marker per finished shard), ``_errors.csv``.

:func:`write_shard` is the one writer, usable from any process that computed a shard (the
local engine's main process, a Ray actor): the shard file is renamed into place complete,
then its marker is; a shard without a marker is computed again, so a crash at any moment
leaves every image either done once or to do. The folder may be a URL prefix
(``s3://bucket/features/``, see :mod:`.folder`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imvec.errors import ImvecError
from imvec.extract.arrow import list_values
from imvec.extract.fingerprint import Fingerprints
from imvec.extract.folder import Folder
from imvec.extract.table import METADATA_KEY, ids_of, output_schema, output_table

__all__ = ["DONE", "JOB", "dataset_record", "done_marker", "inputs_sha256", "is_dataset",
           "marker_name", "read_dataset", "read_marker", "shard_name", "shard_path",
           "write_shard"]

JOB = "_imvec.json"
DONE = "_done"
ERRORS = "_errors.csv"


def is_dataset(output: str | os.PathLike) -> bool:
    """An output without a ``.parquet`` / ``.npy`` suffix names a folder of shards."""
    return Path(output).suffix.lower() not in (".parquet", ".npy")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def marker_name(index: int) -> str:
    return f"{DONE}/{index:05d}.json"


def shard_path(output_dir: str | os.PathLike | Folder, index: int) -> Path | str:
    """The shard's local path, or URL."""
    return Folder.of(output_dir).path(shard_name(index))


def done_marker(output_dir: str | os.PathLike | Folder, index: int) -> Path | str:
    return Folder.of(output_dir).path(marker_name(index))


def inputs_sha256(ids: Sequence[str], prints: Fingerprints) -> str:
    """One digest of a shard's inputs (ids, sizes, mtimes): equal means nothing changed."""
    digest = hashlib.sha256()
    for ident, size, mtime in zip(ids, prints.size.tolist(), prints.mtime_ns.tolist(),
                                  strict=True):
        digest.update(f"{ident}\0{size}\0{mtime}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def write_shard(output_dir: str | os.PathLike | Folder, shard_index: int, ids: Sequence[str],
                vectors: np.ndarray, metadata: dict, *, paths: Sequence[str] | None = None,
                fingerprints: Fingerprints | None = None,
                failures: Sequence[dict] = ()) -> Path | str:
    """Write shard ``shard_index`` (its ok rows; ``failures``: one dict per failed image with
    id, path, reason, file_size, file_mtime_ns, file_hash) atomically, then its done marker.

    ``metadata``: the job's provenance record (:func:`provenance.describe`), plus optional
    ``"shard"`` entries (e.g. ``inputs_sha256``) stored as the shard's own provenance.
    Returns the shard's path (or URL). Safe to call again for the same shard (it replaces
    both)."""
    folder = Folder.of(output_dir)
    record = {k: v for k, v in metadata.items() if k != "shard"}
    # the width from the record: a shard whose every image failed has no row to infer it from
    vectors = np.asarray(vectors, np.float32).reshape(len(ids),
                                                      record["model"]["num_features"])
    shard = {"index": shard_index, "rows": len(ids), "failed": len(failures),
             **metadata.get("shard", {})}
    prints = fingerprints or Fingerprints.from_rows([(-1, -1, None)] * len(ids))
    schema = output_schema(record["model"]["num_features"], record)
    schema = schema.with_metadata({**schema.metadata,
                                   METADATA_KEY + b".shard": json.dumps(shard).encode()})
    table = output_table(ids, paths or ids, vectors, prints, schema)
    folder.write_table(shard_name(shard_index), table, use_dictionary=False)
    body = {**shard, "weights_sha256": record["model"]["weights_sha256"],
            "failures": list(failures)}
    # ASCII JSON escapes the lone surrogates of names that are not UTF-8: read back exactly
    folder.write_text(marker_name(shard_index),
                      json.dumps(body, sort_keys=True, ensure_ascii=True))
    return folder.path(shard_name(shard_index))


def read_marker(output_dir: str | os.PathLike | Folder, index: int) -> dict | None:
    """The done marker of a shard, or None (not done, or a marker a crash left torn)."""
    try:
        return json.loads(Folder.of(output_dir).read_text(marker_name(index)))
    except (OSError, ValueError):
        return None


def _job_file(folder: Folder) -> dict:
    try:
        state = json.loads(folder.read_text(JOB))
    except (OSError, ValueError) as exc:
        raise ImvecError(f"{folder} is not an imvec output folder (no readable {JOB}: "
                         f"{exc})") from exc
    if not isinstance(state, dict) or "record" not in state:
        raise ImvecError(f"{folder} is not an imvec output folder ({JOB} has no record)")
    return state


def dataset_record(output_dir: str | os.PathLike | Folder) -> dict:
    """The provenance record of an output folder."""
    return _job_file(Folder.of(output_dir))["record"]


def read_dataset(output_dir: str | os.PathLike | Folder) -> tuple[list[str], np.ndarray]:
    """``(ids, features)`` of the done shards of an output folder, in listing order."""
    folder = Folder.of(output_dir)
    state = _job_file(folder)
    ids: list[str] = []
    parts = []
    for index in range(state["shards"]):
        if read_marker(folder, index) is None:
            continue
        table = folder.read_columns(shard_name(index), ["id", "id_bytes", "feature"])
        ids.extend(ids_of(table))
        parts.append(list_values(table.column("feature")))
    dim = state["record"]["model"]["num_features"]
    return ids, np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
