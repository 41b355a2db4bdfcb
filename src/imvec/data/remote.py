"""Images where big collections live: fsspec URLs (``s3://``, ``gs://``, ``memory://``, ...)
and members of tar shards, listed in a stable order and read as bytes by the decoders.

An :class:`~imvec.data.sources.Item`'s ``path`` stays one string whatever holds the image,
so every listing, manifest and error report carries it unchanged:

- a local path (``photos/a.jpg``): the decoder opens it itself (regular files only);
- a URL (``s3://bucket/photos/a.jpg``): read whole with one request;
- a tar member (``<archive path or URL>#<member>@<offset>+<size>``): one ranged read of
  ``size`` bytes at ``offset`` of the archive (the member's data, found when listing).

Credentials and endpoints come from the filesystem's own settings: for S3 the usual
``AWS_*`` variables (``AWS_ENDPOINT_URL`` for S3-compatible servers) or fsspec's
``FSSPEC_S3_*`` / ``FSSPEC_S3`` configuration variables.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from imvec.data.decode import ImageDecodeError
from imvec.errors import InputError

__all__ = ["GLOB_CHARS", "filesystem", "image_source", "is_url", "local_path", "member_path",
           "parse_member", "remote_call", "remote_glob", "remote_isfile", "remote_listing",
           "sorted_walk"]

GLOB_CHARS = frozenset("*?[")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")  # two letters at least: not C:/
_MEMBER = re.compile(r"(.*?\.tar)#(.*)@(\d+)\+(\d+)", re.DOTALL | re.IGNORECASE)


def is_url(source: str) -> bool:
    """True for ``proto://...`` (any fsspec protocol, ``file://`` included)."""
    return _URL.match(source) is not None


def local_path(source: str) -> str | None:
    """The local path of a ``file://`` URL, None for any other URL."""
    match = _URL.match(source)
    if match and match.group(1).lower() in ("file", "local"):
        return source[match.end():] or "/"
    return None


def filesystem(url: str, **options: Any) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for ``url``; a clear error when the package
    for its protocol is missing. ``options``: for the filesystem (fsspec's storage options)."""
    try:
        from fsspec.core import url_to_fs
    except ImportError as exc:
        raise InputError(f"{url}: reading URLs needs fsspec; pip install 'imvec[remote]'"
                         ) from exc
    try:
        return url_to_fs(url, **options)
    except ImportError as exc:
        raise InputError(f"{url}: this protocol needs another package ({exc}); pip install "
                         "'imvec[remote]' for s3://, or the fsspec package for it") from exc
    except ValueError as exc:
        raise InputError(f"{url}: not a URL fsspec can open ({exc})") from exc


def member_path(archive: str, name: str, offset: int, size: int) -> str:
    """The ``path`` of tar member ``name`` whose data is ``size`` bytes at ``offset``."""
    return f"{archive}#{name}@{offset}+{size}"


def parse_member(path: str) -> tuple[str, str, int, int] | None:
    """(archive, member, offset, size) of a tar member's ``path``; None for anything else."""
    match = _MEMBER.fullmatch(path)
    if match is None:
        return None
    return match.group(1), match.group(2), int(match.group(3)), int(match.group(4))


def _read_range(archive: str, offset: int, size: int) -> bytes:
    if is_url(archive) and local_path(archive) is None:
        fs, inner = filesystem(archive)
        data = fs.cat_file(inner, start=offset, end=offset + size)
    else:
        with open(local_path(archive) or archive, "rb") as f:
            f.seek(offset)
            data = f.read(size)
    if len(data) != size:
        raise ImageDecodeError(f"the tar shard ends early: {len(data)} of {size} bytes at "
                               f"offset {offset} of {archive} (was it rewritten after listing?"
                               " list again with --relist)")
    return data


def image_source(path: str) -> str | bytes:
    """What the decoder opens for an item's ``path``: a local path as it is (the decoder
    checks it is a regular file), the bytes of a URL or a tar member. Raises
    :class:`~imvec.data.decode.ImageDecodeError` with a one-line reason."""
    member = parse_member(path)
    plain = local_path(path)
    if member is None and (plain is not None or not is_url(path)):
        return plain or path
    try:
        if member is not None:
            return _read_range(member[0], member[2], member[3])
        fs, inner = filesystem(path)
        return fs.cat_file(inner)
    except ImageDecodeError:
        raise
    except FileNotFoundError as exc:
        raise ImageDecodeError(f"file not found: {path}") from exc
    except InputError as exc:
        raise ImageDecodeError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - any storage failure is this image's reason
        raise ImageDecodeError(f"cannot read {path}: {type(exc).__name__}: {exc}") from exc


def sorted_walk(list_dir: Callable[[str], Iterable[tuple[str, bool]]], root: str,
                join: Callable[[str, str], str] = posixpath.join,
                max_depth: int | None = None) -> Iterator[str]:
    """Relative paths (``/``-separated) of the files under ``root``, streamed, in the order
    ``sorted()`` would give the whole list: a folder sorts as its name + ``/``, so each
    folder's entries need sorting, never the whole tree. ``list_dir(folder)`` gives
    (name, is_folder) pairs; hidden names (``.name``) are skipped. ``max_depth``: path
    components at most (1: ``root``'s own files)."""
    def walk(folder: str, prefix: str, depth: int) -> Iterator[str]:
        entries = sorted(((name + "/" if is_dir else name), is_dir)
                         for name, is_dir in list_dir(folder)
                         if name and not name.startswith("."))
        for key, is_dir in entries:
            if not is_dir:
                yield prefix + key
            elif max_depth is None or depth < max_depth:
                yield from walk(join(folder, key[:-1]), prefix + key, depth + 1)

    return walk(root, "", 1)


def _lister(fs: Any) -> Callable[[str], list[tuple[str, bool]]]:
    def list_dir(folder: str) -> list[tuple[str, bool]]:
        entries = []
        for info in fs.ls(folder, detail=True, refresh=True):  # a relist sees new files
            name = info["name"].rstrip("/")
            if name == folder.rstrip("/"):
                continue  # a folder marker object listed as its own content
            entries.append((posixpath.basename(name), info.get("type") == "directory"))
        return entries

    return list_dir


def remote_call(url: str, call: Callable[[], Any]) -> Any:
    """``call()``, a storage failure turned into one line naming ``url``."""
    try:
        return call()
    except FileNotFoundError as exc:
        raise InputError(f"{url}: no such file or folder") from exc
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - credentials, network, permissions: one line
        raise InputError(f"{url}: cannot read it ({type(exc).__name__}: {exc}); check the "
                         "URL and your credentials for it") from exc


def remote_isfile(url: str) -> bool:
    fs, inner = filesystem(url)
    return bool(remote_call(url, lambda: fs.isfile(inner)))


def remote_listing(fs: Any) -> Callable[[str], list[tuple[str, bool]]]:
    """``list_dir`` for :func:`sorted_walk` on an fsspec filesystem (one level per call),
    failures turned into one-line errors."""
    lister = _lister(fs)
    return lambda folder: remote_call(fs.unstrip_protocol(folder), lambda: lister(folder))


def remote_glob(fs: Any, pattern: str, scheme: str) -> Iterator[tuple[str, str]]:
    """(id, URL) of the files matching a URL glob, sorted by id (relative to the fixed
    part), listed one folder at a time down to the pattern's depth."""
    from fsspec.utils import glob_translate

    parts = pattern[len(scheme):].split("/")
    fixed = next(i for i, part in enumerate(parts) if GLOB_CHARS & set(part))
    root = fs._strip_protocol(scheme + "/".join(parts[:fixed])).rstrip("/")
    rest = "/".join(parts[fixed:])
    match = re.compile(glob_translate(rest)).fullmatch
    depth = None if "**" in rest else len(parts) - fixed
    found = 0
    for rel in sorted_walk(remote_listing(fs), root, max_depth=depth):
        if match(rel):
            found += 1
            yield rel, fs.unstrip_protocol(f"{root}/{rel}")
    if not found:
        raise InputError(f"{pattern}: no file matches this pattern")
