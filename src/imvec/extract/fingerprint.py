"""What identifies an input file's content cheaply: its size and mtime (nanoseconds), and
with ``verify_inputs`` a blake2b digest of its bytes.

For a URL the size and a stamp of the store's ETag and time stand for size and mtime; for a
tar member, its archive's (see :func:`fingerprints`).

A fingerprint is taken *before* the image is read, so a file rewritten while (or after) it
is computed shows a fingerprint other than the one recorded, and the next run recomputes
it. An unreadable or missing file gets size -1; a non-regular file (a FIFO) is never opened.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from imvec.data.decode import ImageDecodeError
from imvec.data.remote import image_source, is_url, local_path, parse_member

__all__ = ["FINGERPRINT_FIELDS", "Fingerprints", "fingerprints", "same"]

HASH_CHUNK = 1 << 20
FINGERPRINT_FIELDS = [pa.field("file_size", pa.int64()), pa.field("file_mtime_ns", pa.int64()),
                      pa.field("file_hash", pa.string())]


@dataclass
class Fingerprints:
    """Column-wise fingerprints of a list of files (row i = file i)."""

    size: np.ndarray  # int64, -1 where the file could not be seen
    mtime_ns: np.ndarray  # int64
    hash: list[str | None]

    def row(self, i: int) -> tuple[int, int, str | None]:
        return int(self.size[i]), int(self.mtime_ns[i]), self.hash[i]

    def rows(self) -> list[tuple[int, int, str | None]]:
        return list(zip(self.size.tolist(), self.mtime_ns.tolist(), self.hash, strict=True))

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[int, int, str | None]]) -> Fingerprints:
        return cls(np.array([r[0] for r in rows], np.int64),
                   np.array([r[1] for r in rows], np.int64), [r[2] for r in rows])

    def arrays(self) -> list[pa.Array]:
        """``file_size``, ``file_mtime_ns``, ``file_hash`` columns."""
        return [pa.array(self.size, pa.int64()), pa.array(self.mtime_ns, pa.int64()),
                pa.array(self.hash, pa.string())]


def _digest(path: str) -> str | None:
    digest = hashlib.blake2b(digest_size=16)
    try:
        with open(path, "rb") as f:
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
    except OSError:
        return None
    return digest.hexdigest()


def fingerprints(paths: Sequence[str], verify_inputs: bool = False) -> Fingerprints:
    """Stat (and with ``verify_inputs`` hash) each path: a local file by ``os.stat``; a URL
    by its store's size and version stamp (:func:`remote_stats`), one listing per folder
    where many files share it; a tar member by its archive's (size, stamp) and its own
    offset and size, so a rewritten archive shows as changed."""
    size = np.full(len(paths), -1, np.int64)
    mtime = np.full(len(paths), -1, np.int64)
    hashes: list[str | None] = [None] * len(paths)
    members = {i: m for i, p in enumerate(paths)
               if "#" in p and (m := parse_member(p)) is not None}
    urls = [p for i, p in enumerate(paths) if i not in members and _remote(p)]
    urls += sorted({m[0] for m in members.values() if _remote(m[0])})
    seen: dict[str, tuple[int, int] | None] = {**remote_stats(urls)}
    seen.update((m[0], _local_stat(m[0])) for m in members.values() if not _remote(m[0]))
    for i, path in enumerate(paths):
        member = members.get(i)
        whole = member[0] if member else path
        found = seen.get(whole) if member or _remote(whole) else _local_stat(whole)
        if found is None:
            continue
        if member is None:
            size[i], mtime[i] = found
        else:  # the member's bytes are where the listing saw them while the archive stays
            size[i], mtime[i] = member[3], stamp(found[0], found[1], member[2])
        if verify_inputs and (member is not None or _remote(path)):
            hashes[i] = _digest_source(path)
        elif verify_inputs and os.path.isfile(local_path(path) or path):  # never a FIFO
            hashes[i] = _digest(local_path(path) or path)
    return Fingerprints(size, mtime, hashes)


def _remote(path: str) -> bool:
    return is_url(path) and local_path(path) is None


def _local_stat(path: str) -> tuple[int, int] | None:
    try:
        info = os.stat(local_path(path) or path)
    except (OSError, ValueError):
        return None
    return info.st_size, info.st_mtime_ns


def _digest_source(path: str) -> str | None:
    """The digest of a URL's or tar member's bytes (read whole, as the decoder reads them)."""
    try:
        data = image_source(path)
    except ImageDecodeError:
        return None
    if isinstance(data, str):
        return _digest(data)
    return hashlib.blake2b(data, digest_size=16).hexdigest()


# --- Files behind URLs ------------------------------------------------------------------------

LIST_AT = 8  # files of one folder from which one listing is cheaper than one request each


def stamp(size: int, version: object, offset: int = 0) -> int:
    """A non-negative int64 that changes when ``version`` (an mtime, an ETag, ...), ``size``
    or ``offset`` does: what ``file_mtime_ns`` holds for URLs and tar members."""
    digest = hashlib.blake2b(f"{size}\0{version}\0{offset}".encode(), digest_size=7)
    return int.from_bytes(digest.digest(), "big")


def _version(info: dict) -> object:
    """What changes when an object is rewritten: its ETag (or checksum) and time, as the
    store gives them (S3: ETag, LastModified; GCS: md5Hash, updated; local: mtime)."""
    tag = next((info[k] for k in ("ETag", "etag", "md5Hash", "crc32c", "checksum")
                if info.get(k)), None)
    when = next((info[k] for k in ("LastModified", "last_modified", "mtime", "updated",
                                   "modified", "created") if info.get(k)), None)
    return f"{tag}|{when}"


def remote_stats(urls: Sequence[str]) -> dict[str, tuple[int, int]]:
    """URL -> (size, stamp) of the ones that exist. Files of one folder are looked up with
    one listing when there are :data:`LIST_AT` or more, else one ``info`` request each;
    caches are dropped first, so a file rewritten since an earlier look shows as changed."""
    from imvec.data.remote import filesystem

    groups: dict[tuple[int, str], list[tuple[str, str, object]]] = {}
    for url in dict.fromkeys(urls):
        try:
            fs, inner = filesystem(url)
        except Exception:  # noqa: BLE001 - an unreadable URL fingerprints as missing
            continue
        parent = inner.rsplit("/", 1)[0] if "/" in inner else ""
        groups.setdefault((id(fs), parent), []).append((url, inner, fs))
    found: dict[str, tuple[int, int]] = {}
    for (_, parent), entries in groups.items():
        fs = entries[0][2]
        infos: dict[str, dict] = {}
        try:
            fs.invalidate_cache(parent)
            if len(entries) >= LIST_AT:
                infos = {i["name"].rstrip("/"): i for i in fs.ls(parent, detail=True)}
            else:
                for _, inner, _ in entries:
                    with contextlib.suppress(FileNotFoundError):
                        infos[inner] = fs.info(inner)
        except Exception:  # noqa: BLE001 - storage failures: missing, as for a local file
            continue
        for url, inner, _ in entries:
            info = infos.get(inner.rstrip("/"))
            if info is not None and info.get("type", "file") != "directory":
                size = int(info.get("size") or 0)
                found[url] = (size, stamp(size, _version(info)))
    return found


def same(old: tuple[int, int, str | None], new: tuple[int, int, str | None]) -> bool:
    """Whether a file still has the content it had: by digest when both have one (a copy
    with a new mtime is the same file), else by size and mtime."""
    if old[0] != new[0]:
        return False
    if old[0] < 0:
        return True  # missing then, missing now: its failure stands
    if old[2] is not None and new[2] is not None:
        return old[2] == new[2]
    return old[1] == new[1]
