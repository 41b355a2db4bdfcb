"""Safe unpacking of downloaded archives (.tar.gz / .tgz / .tar, and the .zip bundles
Kaggle may serve).

The whole member list is checked before a single byte is written: one unsafe member
(absolute path, ``..``, a link leaving the archive, a device or fifo, an oversized member,
too many members) refuses the archive as a whole. Links are resolved against the archive's
own members, never the disk: a chain of links that each look safe but together leave the
root is refused, and the refusal says nothing about what exists outside. Extraction then
goes to a temporary sibling directory, with tarfile's ``data`` filter where Python has it as
a second line of defence, and is renamed into place only when complete. Nothing is ever
unpickled.
"""

from __future__ import annotations

import os
import posixpath
import re
import shutil
import tarfile
import zipfile
from pathlib import Path

from imvec.errors import ImvecError, summarize_names

__all__ = ["ARCHIVE_SUFFIXES", "UnsafeArchiveError", "check_members", "extract", "is_archive"]

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".zip")
MAX_MEMBER_BYTES = 16 << 30  # the largest real member (AmoebaNet-A's data shard) is ~1.9 GB
MAX_TOTAL_BYTES = 32 << 30
MAX_MEMBERS = 10_000
MAX_LINK_HOPS = 40  # as Linux's ELOOP bound


class UnsafeArchiveError(ImvecError, ValueError):
    """An archive refused as a whole because a member could escape or exhaust the target."""


def is_archive(path: str | os.PathLike) -> bool:
    """A tar (compressed or not) or zip file, judged by its content, not its name."""
    path = Path(path)
    return path.is_file() and (tarfile.is_tarfile(path) or zipfile.is_zipfile(path))


def _inside(name: str) -> bool:
    """A relative POSIX path that stays inside the extraction root."""
    return not (name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name)
                or ".." in name.replace("\\", "/").split("/"))


def _resolve(path: str, symlinks: dict[str, str]) -> list[str] | str:
    """The components ``path`` leads to once the archive's own symlinks are followed (the
    disk is never consulted), or why it cannot be followed: "outside" or "loop"."""
    done: list[str] = []
    todo, hops = path.split("/"), 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not done:
                return "outside"
            done.pop()
            continue
        here = "/".join([*done, part])
        if here in symlinks:
            hops += 1
            target = symlinks[here]
            if hops > MAX_LINK_HOPS:
                return "loop"
            if target.startswith("/") or re.match(r"^[A-Za-z]:", target):
                return "outside"
            todo = target.split("/") + todo  # relative to the link's own folder: ``done``
            continue
        done.append(part)
    return done


def _link_problem(member: tarfile.TarInfo, symlinks: dict[str, str],
                  files: set[str]) -> str | None:
    name = posixpath.normpath(member.name)
    if member.issym():
        if member.linkname.startswith("/") or re.match(r"^[A-Za-z]:", member.linkname):
            return f"{member.name!r}: symlink to {member.linkname!r} outside the archive"
        where = _resolve(posixpath.join(posixpath.dirname(name), member.linkname), symlinks)
        if where == "loop":
            return f"{member.name!r}: symlink loop"
        if where == "outside":
            lexical = posixpath.normpath(posixpath.join(posixpath.dirname(name),
                                                        member.linkname))
            how = "outside the archive" if not _inside(lexical) else (
                "leaves the archive through other links")
            return f"{member.name!r}: symlink to {member.linkname!r} {how}"
        return None
    target = posixpath.normpath(member.linkname)
    if not _inside(target):
        return f"{member.name!r}: hard link to {member.linkname!r} outside the archive"
    if target not in files or _resolve(target, symlinks) != target.split("/"):
        return (f"{member.name!r}: hard link to {member.linkname!r}, which is not a regular "
                "file listed before it (not through a link)")
    return None


def _problem(member: tarfile.TarInfo, links: set[str], max_member_bytes: int) -> str | None:
    name = member.name
    if "\0" in name or not _inside(name):
        return f"{name!r}: absolute path or '..'"
    parts = posixpath.normpath(name).split("/")
    if any("/".join(parts[:i]) in links for i in range(1, len(parts))):
        return f"{name!r}: lies under a link"
    if not (member.issym() or member.islnk()):
        if member.ischr() or member.isblk() or member.isfifo():
            return f"{name!r}: device file or fifo"
        if not (member.isfile() or member.isdir()):
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
                         ) from None
    links = {posixpath.normpath(m.name) for m in members if m.issym() or m.islnk()}
    symlinks = {posixpath.normpath(m.name): m.linkname for m in members if m.issym()}
    problems, files = [], set()
    for m in members:  # a hard link may only name a file listed before it
        problem = _problem(m, links, max_member_bytes)
        if problem is None and (m.issym() or m.islnk()):
            problem = _link_problem(m, symlinks, files)
        if problem:
            problems.append(problem)
        elif m.isfile():
            files.add(posixpath.normpath(m.name))
    names = [posixpath.normpath(m.name) for m in members]
    if len(set(names)) != len(names) and links:  # a link replaced by a file or vice versa
        problems.append("the same name twice, with links in the archive")
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
        reason = str(e).splitlines()[0].rstrip(":")
        raise ImvecError(f"{archive} is not a readable tar or zip archive ({reason}); "
                         "download it again") from None


def _zip_members(zf: zipfile.ZipFile, archive, max_member_bytes: int = MAX_MEMBER_BYTES,
                 max_total_bytes: int = MAX_TOTAL_BYTES,
                 max_members: int = MAX_MEMBERS) -> list[zipfile.ZipInfo]:
    """The zip's members, or :class:`UnsafeArchiveError`: zips may hold no links at all."""
    members = zf.infolist()
    if len(members) > max_members:
        raise UnsafeArchiveError(f"{archive} has more than {max_members} members; refused "
                                 "(not a model archive)")
    problems, names = [], set()
    for m in members:
        name, mode = m.filename, m.external_attr >> 16
        if "\0" in name or not _inside(name):
            problems.append(f"{name!r}: absolute path or '..'")
        elif (mode & 0o170000) not in (0, 0o100000, 0o040000):
            problems.append(f"{name!r}: a link or special file (zips may hold files only)")
        elif m.flag_bits & 0x1:
            problems.append(f"{name!r}: encrypted")
        elif m.file_size > max_member_bytes:
            problems.append(f"{name!r}: {m.file_size} bytes, over the {max_member_bytes}-byte "
                            "member limit")
        elif posixpath.normpath(name) in names:
            problems.append(f"{name!r}: listed twice")
        names.add(posixpath.normpath(name))
    total = sum(m.file_size for m in members)
    if total > max_total_bytes:
        problems.append(f"{total} bytes in all, over the {max_total_bytes}-byte limit")
    if problems:
        raise UnsafeArchiveError(f"refused {archive}: {len(problems)} unsafe member(s): "
                                 f"{summarize_names(problems, limit=5)}. Nothing was extracted; "
                                 "get the archive from a trusted source")
    return members


def _extract_zip(zf: zipfile.ZipFile, members: list[zipfile.ZipInfo], root: Path) -> None:
    """Each member written by us (never ``extractall``): names were checked, and a member
    yields at most its declared size (zipfile stops there and checks the crc)."""
    for m in members:
        target = root / posixpath.normpath(m.filename)
        if m.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(m) as src, open(target, "xb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)


def check_members(archive: str | os.PathLike, **limits: int) -> list:
    """Every member of ``archive``, or :class:`UnsafeArchiveError` listing all unsafe ones.

    ``limits``: ``max_member_bytes``, ``max_total_bytes``, ``max_members``.
    """
    if not tarfile.is_tarfile(archive) and zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            return _zip_members(zf, archive, **limits)
    with _open(archive) as tar:
        return _checked_members(tar, archive, **limits)


def extract(archive: str | os.PathLike, dest: str | os.PathLike, **limits: int) -> Path:
    """Unpack a checked archive into ``dest`` (which must not exist yet), atomically."""
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} already exists; extract into a new directory")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    is_zip = not tarfile.is_tarfile(archive) and zipfile.is_zipfile(archive)
    with zipfile.ZipFile(archive) if is_zip else _open(archive) as opened:
        members = (_zip_members(opened, archive, **limits) if is_zip else  # before any write
                   _checked_members(opened, archive, **limits))
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if is_zip:
                _extract_zip(opened, members, tmp)
            else:
                options = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                opened.extractall(tmp, members=members, **options)
            os.replace(tmp, dest)
        except (tarfile.TarError, zipfile.BadZipFile, EOFError) as e:
            raise UnsafeArchiveError(f"refused {archive} while extracting ({e}); nothing was "
                                     "kept") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest
