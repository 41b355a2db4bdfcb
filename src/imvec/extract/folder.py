"""The output folder of a sharded job: a local folder or an fsspec URL prefix (``s3://b/x/``).

One interface for the few things :mod:`.dataset`, :mod:`.shards` and :mod:`.manifest` do
with it, by names relative to the folder (``_done/00000.json``):

- writes are atomic either way: a local file is written beside and renamed
  (:mod:`imvec._io`); an object is written with one call (``pipe_file``: one ``PUT``, or a
  multipart upload for big bodies, which S3 and GCS show only once complete), so a reader
  sees the old object or the whole new one, never a part;
- Parquet is read and written by path locally (a Python file object aborts pyarrow + torch
  processes at exit, see :func:`.arrow.read_columns`), through Arrow's own buffers for URLs;
- the lock: a file lock in the folder, or for a URL one under ``$IMVEC_HOME/locks`` keyed by
  the URL. An object store has no locks: two processes of one machine cannot write the
  same URL at once, two machines writing the same prefix at once are not detected.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import posixpath
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from imvec._io import atomic_path, atomic_write_bytes
from imvec._paths import home
from imvec.data.remote import filesystem, is_url, local_path
from imvec.extract.arrow import read_columns

__all__ = ["Folder", "is_remote"]

LOCK = ".lock"


def is_remote(location: str | os.PathLike) -> bool:
    """True for a URL that is not a local file (``file://`` names a local path)."""
    text = os.fspath(location)
    return is_url(text) and local_path(text) is None


class Folder:
    """An output folder, local or at a URL; ``location`` is what messages name."""

    def __init__(self, location: str | os.PathLike) -> None:
        text = os.fspath(location)
        self.remote = is_remote(text)
        self.fs: Any = None
        if self.remote:
            # no listings cache: Ray actors and other processes write here too
            self.fs, root = filesystem(text, use_listings_cache=False)
            self.root: str | Path = root.rstrip("/")
            self.location: str | Path = self.fs.unstrip_protocol(self.root)
        else:
            self.root = self.location = Path(local_path(text) or text)

    @classmethod
    def of(cls, location: str | os.PathLike | Folder) -> Folder:
        return location if isinstance(location, Folder) else cls(location)

    def child(self, name: str) -> Folder:
        """The subfolder ``name``, as a folder of its own."""
        return Folder(self.path(name))

    def __str__(self) -> str:
        return str(self.location)

    def path(self, name: str = "") -> Path | str:
        """The local path or URL of ``name`` (the folder itself for ``""``)."""
        if not self.remote:
            return self.root / name if name else self.root
        return f"{self.location}/{name}" if name else self.location

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}" if name else str(self.root)

    def is_file(self, name: str) -> bool:
        if not self.remote:
            return (self.root / name).is_file()
        return bool(self.fs.isfile(self._key(name)))

    def names(self, name: str = "") -> list[str]:
        """The names directly in the folder (or its subfolder ``name``); [] if there is none."""
        if not self.remote:
            folder = self.root / name if name else self.root
            return [p.name for p in folder.iterdir()] if folder.is_dir() else []
        key = self._key(name).rstrip("/")
        try:
            found = self.fs.ls(key, detail=False)
        except FileNotFoundError:
            return []
        return [posixpath.basename(f.rstrip("/")) for f in found if f.rstrip("/") != key]

    def glob(self, pattern: str) -> list[str]:
        """Names directly in the folder that match ``pattern`` (fnmatch)."""
        return [n for n in self.names() if fnmatch.fnmatchcase(n, pattern)]

    def read_bytes(self, name: str) -> bytes:
        if not self.remote:
            return (self.root / name).read_bytes()
        return self.fs.cat_file(self._key(name))

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``name`` atomically (durably on a local disk)."""
        if not self.remote:
            (self.root / name).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.root / name, data)
        else:
            self.fs.pipe_file(self._key(name), data)

    def write_text(self, name: str, text: str) -> None:
        self.write_bytes(name, text.encode("utf-8"))

    def write_table(self, name: str, table: pa.Table, **options) -> None:
        """``table`` as the Parquet file ``name``, atomically (``options``: for
        ``pq.write_table``)."""
        if not self.remote:
            (self.root / name).parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.root / name) as tmp:
                pq.write_table(table, tmp, **options)  # by path (see arrow.read_columns)
            return
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, **options)
        self.fs.pipe_file(self._key(name), sink.getvalue().to_pybytes())

    def read_columns(self, name: str, columns: list[str]) -> pa.Table:
        """Some columns of the Parquet file ``name``."""
        if not self.remote:
            return read_columns(self.root / name, columns)
        data = self.fs.cat_file(self._key(name))
        with pq.ParquetFile(pa.BufferReader(data)) as parquet:
            return parquet.read(columns=columns)

    def remove(self, name: str) -> None:
        """Delete the file or subfolder ``name``, if there is one."""
        if not self.remote:
            path = self.root / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            return
        key = self._key(name)
        if self.fs.exists(key):
            self.fs.rm(key, recursive=True)

    def move(self, source: str, target: str) -> None:
        """Rename the subfolder ``source`` to ``target`` (replacing it). A local rename is
        one step; an object store copies each object then deletes the originals."""
        if not self.remote:
            (self.root / source).replace(self.root / target)
            return
        self.remove(target)
        for name in self.names(source):
            self.fs.copy(self._key(f"{source}/{name}"), self._key(f"{target}/{name}"))
        self.remove(source)

    def mkdir(self, name: str = "") -> None:
        """Make the folder (or its subfolder ``name``)."""
        if not self.remote:  # an object store has no folders to make
            Path(self.path(name)).mkdir(parents=True, exist_ok=True)

    def lock(self) -> FileLock:
        """The lock a writer of this folder holds (not acquired yet)."""
        if not self.remote:
            return FileLock(str(self.root / LOCK), timeout=0)
        locks = home() / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(str(self.location).encode("utf-8")).hexdigest()[:40]
        return FileLock(str(locks / f"{digest}.lock"), timeout=0)
