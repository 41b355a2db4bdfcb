"""Safe unpacking of downloaded archives (.tar.gz / .tgz / .tar).

The whole member list is checked before a single byte is written: one unsafe member
(absolute path, ``..``, a link leaving the archive, a device or fifo, an oversized member,
too many members) refuses the archive as a whole. Extraction then goes to a temporary
sibling directory, with tarfile's ``data`` filter where Python has it as a second line of
defence, and is renamed into place only when complete. Nothing is ever unpickled.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import tarfile
from pathlib import Path

from imvec.errors import ImvecError, summarize_names

__all__ = ["ARCHIVE_SUFFIXES", "UnsafeArchiveError", "check_members", "extract", "is_archive"]

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
MAX_MEMBER_BYTES = 16 << 30  # the largest real member (AmoebaNet-A's data shard) is ~1.9 GB
MAX_TOTAL_BYTES = 32 << 30
MAX_MEMBERS = 10_000


class UnsafeArchiveError(ImvecError, ValueError):
    """An archive refused as a whole because a member could escape or exhaust the target."""


def is_archive(path: str | os.PathLike) -> bool:
    """A tar file (compressed or not), judged by its content, not its name."""
    path = Path(path)
    return path.is_file() and tarfile.is_tarfile(path)


def _inside(name: str) -> bool:
    """A relative POSIX path that stays inside the extraction root."""
    return not (name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name)
                or ".." in name.replace("\\", "/").split("/"))


def _problem(member: tarfile.TarInfo, links: set[str], max_member_bytes: int) -> str | None:
    name = member.name
    if "\0" in name or not _inside(name):
        return f"{name!r}: absolute path or '..'"
    parts = posixpath.normpath(name).split("/")
    if any("/".join(parts[:i]) in links for i in range(1, len(parts))):
        return f"{name!r}: lies under a link"
    if member.issym():
        target = posixpath.normpath(posixpath.join(posixpath.dirname(name), member.linkname))
        if member.linkname.startswith("/") or not _inside(target):
            return f"{name!r}: symlink to {member.linkname!r} outside the archive"
    elif member.islnk():
        if not _inside(posixpath.normpath(member.linkname)):
            return f"{name!r}: hard link to {member.linkname!r} outside the archive"
    elif member.ischr() or member.isblk() or member.isfifo():
        return f"{name!r}: device file or fifo"
    elif not (member.isfile() or member.isdir()):
        return f"{name!r}: unsupported member type {member.type!r}"
    if member.size > max_member_bytes:
        return f"{name!r}: {member.size} bytes, over the {max_member_bytes}-byte member limit"
    return None


def _checked_members(tar: tarfile.TarFile, archive, max_member_bytes: int = MAX_MEMBER_BYTES,
                     max_total_bytes: int = MAX_TOTAL_BYTES,
                     max_members: int = MAX_MEMBERS) -> list[tarfile.TarInfo]:
    members = []
    try:
        for member in tar:  # streamed, so an absurd member list stops early
            members.append(member)
            if len(members) > max_members:
                raise UnsafeArchiveError(f"{archive} has more than {max_members} members; "
                                         "refused (not a model archive)")
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ImvecError(f"{archive} is not a readable tar archive ({e}); download it again"
                         ) from e
    links = {posixpath.normpath(m.name) for m in members if m.issym() or m.islnk()}
    problems = [p for m in members if (p := _problem(m, links, max_member_bytes))]
    total = sum(m.size for m in members if m.isfile())
    if total > max_total_bytes:
        problems.append(f"{total} bytes in all, over the {max_total_bytes}-byte limit")
    if problems:
        raise UnsafeArchiveError(f"refused {archive}: {len(problems)} unsafe member(s): "
                                 f"{summarize_names(problems, limit=5)}. Nothing was extracted; "
                                 "get the archive from a trusted source")
    return members


def _open(archive) -> tarfile.TarFile:
    try:
        return tarfile.open(archive, "r:*")
    except (tarfile.TarError, OSError) as e:
        raise ImvecError(f"{archive} is not a readable tar archive ({e}); download it again"
                         ) from e


def check_members(archive: str | os.PathLike, **limits: int) -> list[tarfile.TarInfo]:
    """Every member of ``archive``, or :class:`UnsafeArchiveError` listing all unsafe ones.

    ``limits``: ``max_member_bytes``, ``max_total_bytes``, ``max_members``.
    """
    with _open(archive) as tar:
        return _checked_members(tar, archive, **limits)


def extract(archive: str | os.PathLike, dest: str | os.PathLike, **limits: int) -> Path:
    """Unpack a checked archive into ``dest`` (which must not exist yet), atomically."""
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} already exists; extract into a new directory")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    with _open(archive) as tar:
        members = _checked_members(tar, archive, **limits)  # before anything is written
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            options = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **options)
            os.replace(tmp, dest)
        except tarfile.TarError as e:
            raise UnsafeArchiveError(f"refused {archive} while extracting ({e}); nothing was "
                                     "kept") from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
