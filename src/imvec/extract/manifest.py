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

from imvec.data.sources import Item
from imvec.extract.arrow import decode_raw, raw
from imvec.extract.folder import Folder

__all__ = ["MANIFEST", "manifest_path", "read_manifest", "write_manifest"]

MANIFEST = "_manifest"


def _name(index: int) -> str:
    return f"{MANIFEST}/{index:05d}.parquet"


def manifest_path(output_dir: str | os.PathLike | Folder, index: int) -> Path | str:
    return Folder.of(output_dir).path(_name(index))


def write_manifest(output_dir: str | os.PathLike | Folder, items: Iterable[Item],
                   shard_size: int, first: int = 0) -> tuple[int, int]:
    """Write ``items`` as manifest shards ``first``, ``first + 1``, ...; returns (shards,
    images) written."""
    folder = Folder.of(output_dir)
    folder.mkdir(MANIFEST)
    stream: Iterator[Item] = iter(items)
    shards = images = 0
    while chunk := list(islice(stream, shard_size)):
        table = pa.table([raw([i.id for i in chunk]), raw([i.path for i in chunk])],
                         names=["id", "path"])
        folder.write_table(_name(first + shards), table)
        shards += 1
        images += len(chunk)
    return shards, images


def read_manifest(output_dir: str | os.PathLike | Folder, index: int) -> list[Item]:
    """The inputs of shard ``index``, in listing order."""
    table = Folder.of(output_dir).read_columns(_name(index), ["id", "path"])
    return [Item(i, p) for i, p in zip(decode_raw(table.column("id")),
                                       decode_raw(table.column("path")), strict=True)]


def manifest_ids(output_dir: str | os.PathLike | Folder, shards: int) -> set[str]:
    """Every id the manifest holds (for ``--relist``: the one step that holds them all)."""
    folder = Folder.of(output_dir)
    ids: set[str] = set()
    for index in range(shards):
        ids.update(decode_raw(folder.read_columns(_name(index), ["id"]).column("id")))
    return ids
