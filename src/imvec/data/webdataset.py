"""WebDataset tar shards and img2dataset output folders as inputs, ids from their keys.

A WebDataset sample is the run of tar members sharing a key: the member name up to the first
``.`` of its last path component (``images/cat.0.jpg`` -> key ``images/cat``, extension
``0.jpg``). A sample's image is its first member whose whole extension is an image type
(``jpg``, ``jpeg``, ``png``, ``webp``, ...; ``seg.png`` is not the sample's image). Its id is
``<shard>/<key>``, where ``<shard>`` is the shard's path relative to the input's root without
``.tar`` (``00000.tar`` -> ``00000/000000001``): unique by construction, so listing needs no
memory of earlier ids. Listing reads the tar headers once (only those of a local shard; a
remote shard is read through in large blocks) and records each image's offset and size, so a
decoder reads just that member's bytes, one ranged read.

img2dataset writes either ``00000.tar`` shards (``--output_format webdataset``) or
``00000/000000001.jpg`` folders (``files``), each shard with ``00000.parquet`` and
``00000_stats.json`` beside it. Both give the same ids, ``00000/000000001``: the last part
is img2dataset's ``key`` (join on ``id.split("/")[-1]``).
"""

from __future__ import annotations

import functools
import re
import tarfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from imvec.data.remote import filesystem, is_url, local_path, member_path, sorted_walk
from imvec.errors import InputError

__all__ = ["IMAGE_MEMBER_TYPES", "LIST_AHEAD", "img2dataset_items", "img2dataset_shards",
           "in_order", "sample_key", "tar_items"]

# Extensions (lower case, no dot) a sample's image member may have.
IMAGE_MEMBER_TYPES = frozenset({"jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff",
                                "ppm", "pgm", "pnm"})
_STATS = re.compile(r"(.+)_stats\.json")
_BLOCK = 8 << 20  # bytes per request when reading a remote shard's headers
# Shards listed at once, in threads: a remote shard is read through to find its headers,
# so one stream at a time would make listing as slow as one download of the collection.
LIST_AHEAD = 8


def sample_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member name, WebDataset's rule: split at the first dot of the
    last path component."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext if dot else "")


def _open(archive: str) -> Any:
    plain = local_path(archive)
    if plain is not None or not is_url(archive):
        return open(plain or archive, "rb")
    fs, inner = filesystem(archive)
    return fs.open(inner, "rb", block_size=_BLOCK, cache_type="readahead")


def tar_items(archive: str, prefix: str) -> Iterator[tuple[str, str]]:
    """(id, path) of each sample's image in tar shard ``archive`` (a local path or a URL),
    in the shard's own order; ``prefix`` + key is the id."""
    try:
        with _open(archive) as file, tarfile.open(fileobj=file, mode="r:") as tar:
            seen: set[str] = set()
            while (member := tar.next()) is not None:
                tar.members.clear()  # the index is ours (offsets), tarfile need not keep one
                if not member.isreg():
                    continue
                key, ext = sample_key(member.name)
                if ext.lower() not in IMAGE_MEMBER_TYPES or key in seen:
                    continue
                seen.add(key)
                yield prefix + key, member_path(archive, member.name, member.offset_data,
                                                member.size)
    except FileNotFoundError as exc:
        raise InputError(f"{archive}: no such tar shard") from exc
    except (OSError, tarfile.TarError) as exc:
        raise InputError(f"{archive}: cannot read this tar shard ({type(exc).__name__}: "
                         f"{exc}); is it a complete, uncompressed .tar?") from exc


def img2dataset_shards(names: Iterable[tuple[str, bool]]) -> list[tuple[str, str]] | None:
    """(shard stem, kind: "tar" or "files") of an img2dataset output folder, from its top
    level's (name, is_folder) entries; None when the folder is not one (no
    ``<shard>_stats.json`` beside a ``<shard>.tar`` or ``<shard>/``)."""
    entries = {(name, is_dir) for name, is_dir in names}
    stems = {m.group(1) for name, is_dir in entries if not is_dir
             and (m := _STATS.fullmatch(name))}
    if not stems:
        return None
    shards = []
    for stem in sorted(stems):
        if (f"{stem}.tar", False) in entries:
            shards.append((stem, "tar"))
        elif (stem, True) in entries:
            shards.append((stem, "files"))
    if not shards and any((f"{s}.parquet", False) in entries for s in stems):
        raise InputError("this img2dataset folder holds no .tar shards or image folders (its "
                         "'parquet' or 'tfrecord' output format?); imvec reads its "
                         "'webdataset' and 'files' formats")
    return shards or None


def in_order(tasks: Iterable[Callable[[], list] | list], ahead: int = LIST_AHEAD) -> Iterator:
    """The lists ``tasks`` return (or are: no thread for what is known), concatenated in
    the tasks' order, with up to ``ahead`` of them running at once in threads (storage reads
    wait on the network, not the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(ahead) as pool:
        window: deque = deque()
        for task in tasks:
            window.append(task if isinstance(task, list) else pool.submit(task))
            while len(window) >= ahead or (window and isinstance(window[0], list)):
                first = window.popleft()
                yield from (first if isinstance(first, list) else first.result())
        while window:
            first = window.popleft()
            yield from (first if isinstance(first, list) else first.result())


def img2dataset_items(root: str, shards: list[tuple[str, str]],
                      list_dir: Callable[[str], Iterable[tuple[str, bool]]],
                      join: Callable[..., str], locate: Callable[[str], str] = str,
                      ) -> Iterator[tuple[str, str]]:
    """(id, path) of an img2dataset folder's samples, shard by shard (several listed at
    once): ids ``<shard>/<key>``. ``locate``: a path inside the folder's filesystem -> what
    opens it (its URL)."""
    def files(stem: str) -> Iterator[tuple[str, str]]:
        last = None
        for rel in sorted_walk(list_dir, join(root, stem), join):
            key, ext = sample_key(rel)
            if ext.lower() in IMAGE_MEMBER_TYPES and key != last:  # a key's files are adjacent
                last = key
                yield f"{stem}/{key}", locate(join(root, stem, *rel.split("/")))

    def shard(stem: str, kind: str) -> list[tuple[str, str]]:
        if kind == "tar":
            return list(tar_items(locate(join(root, f"{stem}.tar")), f"{stem}/"))
        return list(files(stem))

    return in_order(functools.partial(shard, stem, kind) for stem, kind in shards)
