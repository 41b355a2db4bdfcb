"""The listing of a sharded job, saved once so that a resume does not list again.

``_manifest/00000.parquet`` holds the inputs of shard 0 (``id``, ``path``, as exact bytes:
names that are not UTF-8 survive), ``00001.parquet`` those of shard 1, and so on. The
listing is consumed as a stream and written a shard at a time, so memory holds one shard.
New inputs (``--relist``) become new shards after the last one: a shard never changes its
slice of the listing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from imvec._io import atomic_path
from imvec.data.sources import Item
from imvec.extract.arrow import decode_raw, raw, read_columns

__all__ = ["MANIFEST", "manifest_path", "read_manifest", "write_manifest"]

MANIFEST = "_manifest"


def manifest_path(output_dir: str | os.PathLike, index: int) -> Path:
    return Path(output_dir) / MANIFEST / f"{index:05d}.parquet"


def write_manifest(output_dir: str | os.PathLike, items: Iterable[Item], shard_size: int,
                   first: int = 0) -> tuple[int, int]:
    """Write ``items`` as manifest shards ``first``, ``first + 1``, ...; returns (shards,
    images) written."""
    (Path(output_dir) / MANIFEST).mkdir(parents=True, exist_ok=True)
    stream: Iterator[Item] = iter(items)
    shards = images = 0
    while chunk := list(islice(stream, shard_size)):
        table = pa.table([raw([i.id for i in chunk]), raw([i.path for i in chunk])],
                         names=["id", "path"])
        with atomic_path(manifest_path(output_dir, first + shards)) as tmp:
            pq.write_table(table, tmp)
        shards += 1
        images += len(chunk)
    return shards, images


def read_manifest(output_dir: str | os.PathLike, index: int) -> list[Item]:
    """The inputs of shard ``index``, in listing order."""
    table = read_columns(manifest_path(output_dir, index), ["id", "path"])
    return [Item(i, p) for i, p in zip(decode_raw(table.column("id")),
                                       decode_raw(table.column("path")), strict=True)]


def manifest_ids(output_dir: str | os.PathLike, shards: int) -> set[str]:
    """Every id the manifest holds (for ``--relist``: the one step that holds them all)."""
    ids: set[str] = set()
    for index in range(shards):
        ids.update(decode_raw(read_columns(manifest_path(output_dir, index), ["id"])
                              .column("id")))
    return ids
