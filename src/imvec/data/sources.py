"""Which images a job covers, each with a stable id: folders, globs, path lists, tables,
URLs (``s3://``, ``gs://``, ... through fsspec), WebDataset tar shards (also by brace
pattern, ``{000..099}.tar``) and img2dataset output folders.

An id is the image's path relative to its input's root, with ``/`` separators: the folder
for a folder or URL prefix, the fixed part of a glob (``photos/*/*.jpg`` -> ``photos``),
the list's or table's own folder for a path list or table (a table's ``id`` column wins
when it has one); a tar shard is a folder named after it without ``.tar``, its samples
named by key (``00000/000000001``, see :mod:`imvec.data.webdataset`). The same files give
the same ids on every run and every machine, which is what resuming and joining results
rely on. Listing order is deterministic: folders, prefixes and globs sorted by id, lists,
tables and shards in their own order, inputs in the order given. :func:`iter_images`
streams it (memory independent of the collection's size); :func:`list_images` keeps it.
"""

from __future__ import annotations

import functools
import glob
import os
import posixpath
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from imvec.data import remote
from imvec.data.remote import GLOB_CHARS, is_url, local_path, sorted_walk
from imvec.data.webdataset import img2dataset_items, img2dataset_shards, in_order, tar_items
from imvec.errors import InputError, summarize_names

__all__ = ["IMAGE_EXTENSIONS", "LIST_EXTENSIONS", "TABLE_EXTENSIONS", "Item", "expand_braces",
           "iter_images", "list_images"]

IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".webp", ".tif",
    ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico",
})
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list"})
TABLE_EXTENSIONS = frozenset({".parquet", ".csv", ".tsv"})
_BRACES = re.compile(r"\{([^{}]*(?:\.\.|,)[^{}]*)\}")  # {000..099} or {a,b}
_COMPRESSED_TARS = (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst")


@dataclass(frozen=True)
class Item:
    """One image of a job: its stable id and the path it is read from."""

    id: str
    path: str


def list_images(inputs: Sequence[str | os.PathLike], path_column: str = "path") -> list[Item]:
    """Every image the inputs name, in a deterministic order, ids unique.

    Raises :class:`~imvec.errors.InputError` for an input that does not exist, cannot be
    read, or names no image, and for two different files that would get the same id.
    """
    return list(iter_images(inputs, path_column))


def iter_images(inputs: Sequence[str | os.PathLike], path_column: str = "path"
                ) -> Iterator[Item]:
    """:func:`list_images`, streamed: a folder, prefix or shard set is listed a folder (or
    a shard) at a time, so memory does not grow with the collection. Ids are remembered
    only where they could clash (several inputs, path lists, tables); a clash is raised
    when the listing ends, so a consumer must not keep a listing that did not finish."""
    if not inputs:
        raise InputError("no inputs given; pass folders, globs, path lists, tables, tar "
                         "shards or URLs")
    seen: dict[str, str] = {}
    clashes: list[str] = []
    for source in inputs:
        source = os.fspath(source)
        found, unique = _one_input(source, path_column)
        count = 0
        for item in found:
            count += 1
            if (len(inputs) == 1 and unique) or _first(item, seen, clashes):
                yield item
        if not count:
            raise InputError(f"{source}: no images found (looked for "
                             f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
    if clashes:
        raise InputError(f"{len(clashes)} ids name two different files: "
                         f"{summarize_names(clashes, 3)}. Ids are paths relative to each "
                         "input; pass the common parent folder once, or give a table with an "
                         "'id' column")


def _first(item: Item, seen: dict[str, str], clashes: list[str]) -> bool:
    """True the first time an id comes; a repeat of the same file is dropped, another
    file with that id is a clash."""
    other = seen.get(item.id)
    if other is None:
        seen[item.id] = item.path
        return True
    if os.path.normpath(other) != os.path.normpath(item.path):
        clashes.append(f"{item.id} ({other} and {item.path})")
    return False


def _one_input(source: str, path_column: str) -> tuple[Iterable[Item], bool]:
    """The items of one input, and whether its ids are unique by construction."""
    plain = local_path(source)
    if plain is None and is_url(source):
        return _remote(source, path_column)
    source = plain or source
    path = Path(source)
    if path.is_dir():
        return _folder(path), True
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in LIST_EXTENSIONS:
            return _path_list(path), False
        if suffix in TABLE_EXTENSIONS:
            return _table(path, path_column), False
        if suffix == ".tar":
            return _shard(source, path.stem), True
        _refuse_compressed(source)
        return [Item(path.name, str(path))], True
    if _BRACES.search(source):
        return _braces(source), True
    if GLOB_CHARS & set(source):
        return _glob(source), True
    if path.exists() or os.path.lexists(path):
        raise InputError(f"{source}: cannot read it (not a file or folder, or a broken link)")
    raise InputError(f"{source}: no such file or folder")


def _refuse_compressed(source: str) -> None:
    if source.lower().endswith(_COMPRESSED_TARS):
        raise InputError(f"{source}: a compressed tar shard cannot be read member by member; "
                         "decompress it to .tar (e.g. gunzip) first")


def _shard(archive: str, prefix: str) -> Iterator[Item]:
    return _items(tar_items(archive, prefix + "/" if prefix else ""))


def _items(pairs: Iterable[tuple[str, str]]) -> Iterator[Item]:
    return (Item(ident, path) for ident, path in pairs)


def _local_lister(root: Path):
    def list_dir(folder: str) -> list[tuple[str, bool]]:
        try:
            with os.scandir(folder) as entries:
                # a link to a folder is not followed (as os.walk), so no loop is walked
                return [(e.name, is_dir) for e in entries
                        if not ((is_dir := e.is_dir()) and e.is_symlink())]
        except OSError as error:
            raise InputError(f"{root}: cannot list {error.filename}: {error.strerror}; fix "
                             "its permissions or leave it out") from error

    return list_dir


def _folder(root: Path) -> Iterator[Item]:
    """Images under ``root``, recursively, sorted by id; hidden files and folders
    (``.name``) skipped. An img2dataset output folder gives its samples instead."""
    lister = _local_lister(root)
    shards = img2dataset_shards(lister(str(root)))
    if shards:
        for ident, path in img2dataset_items(str(root), shards, lister, os.path.join):
            yield Item(ident, path)
        return
    for rel in sorted_walk(lister, str(root), os.path.join):
        if Path(rel).suffix.lower() in IMAGE_EXTENSIONS:
            yield Item(rel, os.path.join(root, *rel.split("/")))


def _glob(pattern: str) -> list[Item]:
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if GLOB_CHARS & set(part)), len(parts))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    files = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    if not files:
        raise InputError(f"{pattern}: no file matches this pattern")
    items = [Item(Path(os.path.relpath(p, root)).as_posix(), p) for p in files]
    return _expand_shards(sorted(items, key=lambda item: item.id))


def _expand_shards(items: Iterable[Item]) -> Iterator[Item]:
    """Matched files as they are, except tar shards: their samples, ids ``<shard>/<key>``
    (several shards listed at once, the order kept)."""
    return in_order(_expanded(item) for item in items)


def _expanded(item: Item) -> Callable[[], list[Item]] | list[Item]:
    if item.id.lower().endswith(".tar"):
        return functools.partial(list, _shard(item.path, item.id[:-4]))
    _refuse_compressed(item.path)
    return [item]


def expand_braces(pattern: str) -> list[str]:
    """Shell-style brace expansion as WebDataset writes shard sets: ``{000..123}`` (zero
    padding kept), ``{a,b}``; several braces multiply; no nesting."""
    match = _BRACES.search(pattern)
    if match is None:
        return [pattern]
    body = match.group(1)
    numbers = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if numbers:
        first, last = numbers.groups()
        width = max(len(first), len(last)) if "0" in (first[0], last[0]) else 0
        step = 1 if int(last) >= int(first) else -1
        options = [str(i).zfill(width) for i in range(int(first), int(last) + step, step)]
    else:
        options = body.split(",")
    tails = expand_braces(pattern[match.end():])
    return [pattern[:match.start()] + option + tail for option in options for tail in tails]


def _braces(pattern: str) -> Iterator[Item]:
    """A brace pattern's files (tar shards or images) in its own order; ids relative to the
    folder before the first brace."""
    root = pattern[:pattern.index("{")].rpartition("/")[0]
    on_remote = is_url(pattern) and local_path(pattern) is None

    def files() -> Iterator[Item]:
        for name in expand_braces(pattern):
            exists = remote.remote_isfile(name) if on_remote else os.path.isfile(name)
            if not exists:
                raise InputError(f"{name}: no such file (from the pattern {pattern}); fix "
                                 "the range or list the shards that exist")
            yield Item(name[len(root) + 1:] if root else name, name)

    return _expand_shards(files())


def _resolve(entries: Iterable[str], root: str) -> list[Item]:
    """Paths as written in a list or table: relative ones are relative to ``root`` (a folder
    or a URL); a URL is its own id."""
    on_remote, base, items = is_url(root), Path(root), []
    for entry in entries:
        if is_url(entry):
            items.append(Item(entry, entry))
        elif on_remote:
            ident = posixpath.normpath(entry.lstrip("/"))
            items.append(Item(ident, f"{root.rstrip('/')}/{ident}"))
        else:
            path = Path(entry)
            full = path if path.is_absolute() else base / path
            try:
                ident = full.relative_to(base) if path.is_absolute() else path
            except ValueError:
                ident = path
            items.append(Item(Path(os.path.normpath(ident)).as_posix(), str(full)))
    return items


def _path_list(path: Path | str, data: bytes | None = None) -> list[Item]:
    try:
        text = path.read_text(encoding="utf-8") if data is None else data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read this path list ({exc})") from exc
    lines = text.splitlines()
    return _resolve((line.strip() for line in lines if line.strip()), _parent(path))


def _parent(path: Path | str) -> str:
    return str(path.parent) if isinstance(path, Path) else path.rpartition("/")[0]


def _table(path: Path | str, path_column: str, data: bytes | None = None) -> list[Item]:
    """A table of image paths; ``data``: the bytes of a remote table named ``path``."""
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet as pq

    source = path if data is None else pa.BufferReader(data)
    suffix = posixpath.splitext(str(path))[1].lower()
    try:
        if suffix == ".parquet":
            names = pq.read_schema(source).names
            if path_column not in names:
                table = pa.table({name: [] for name in names})
            else:
                table = pq.read_table(source, columns=[c for c in (path_column, "id")
                                                       if c in names])
        else:
            delimiter = "\t" if suffix == ".tsv" else ","
            table = pa.csv.read_csv(source,
                                    parse_options=pa.csv.ParseOptions(delimiter=delimiter),
                                    convert_options=pa.csv.ConvertOptions(
                                        strings_can_be_null=False))
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{path}: cannot read this table ({exc})") from exc
    if path_column not in table.column_names:
        raise InputError(f"{path}: no column {path_column!r}; its columns are "
                         f"{', '.join(table.column_names)}. Name the column of image paths "
                         "with --path-column")
    paths = [str(p) for p in table.column(path_column).to_pylist() if p not in (None, "")]
    items = _resolve(paths, _parent(path))
    if "id" in table.column_names and path_column != "id":
        ids = [str(i) for i, p in zip(table.column("id").to_pylist(),
                                      table.column(path_column).to_pylist(), strict=True)
               if p not in (None, "")]
        items = [Item(ident, item.path) for ident, item in zip(ids, items, strict=True)]
    return items


def _remote(url: str, path_column: str) -> tuple[Iterable[Item], bool]:
    """A URL input: a folder (prefix), a file, a glob or a brace pattern of files."""
    if _BRACES.search(url):
        return _braces(url), True
    fs, inner = remote.filesystem(url)
    scheme = url[:url.index("://") + 3]
    if GLOB_CHARS & set(url[len(scheme):]):
        return _expand_shards(_items(remote.remote_glob(fs, url, scheme))), True
    kind = remote.remote_call(url, lambda: fs.info(inner).get("type"))
    if kind == "directory":
        return _remote_folder(fs, inner.rstrip("/")), True
    name = posixpath.basename(inner)
    suffix = posixpath.splitext(name)[1].lower()
    if suffix in LIST_EXTENSIONS | TABLE_EXTENSIONS:
        data = remote.remote_call(url, lambda: fs.cat_file(inner))
        if suffix in LIST_EXTENSIONS:
            return _path_list(url, data), False
        return _table(url, path_column, data), False
    if suffix == ".tar":
        return _shard(url, posixpath.splitext(name)[0]), True
    _refuse_compressed(url)
    return [Item(name, url)], True


def _remote_folder(fs, root: str) -> Iterator[Item]:
    """Images under a remote folder (prefix), sorted by id, listed one folder at a time;
    an img2dataset folder gives its samples instead."""
    lister = remote.remote_listing(fs)
    shards = img2dataset_shards(lister(root))
    if shards:
        yield from _items(img2dataset_items(root, shards, lister, posixpath.join,
                                            fs.unstrip_protocol))
        return
    for rel in sorted_walk(lister, root):
        if posixpath.splitext(rel)[1].lower() in IMAGE_EXTENSIONS:
            yield Item(rel, fs.unstrip_protocol(f"{root}/{rel}"))
