"""Which images a job covers, each with a stable id: folders, globs, path lists, tables.

An id is the image's path relative to its input's root, with ``/`` separators: the folder
for a folder, the fixed part of a glob (``photos/*/*.jpg`` -> ``photos``), the list's or
table's own folder for a path list or table (a table's ``id`` column wins when it has one).
The same files give the same ids on every run and every machine, which is what resuming
and joining results rely on. Listing order is deterministic: folders and globs sorted by id,
lists and tables in their own order, inputs in the order given.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from imvec.errors import InputError, summarize_names

__all__ = ["IMAGE_EXTENSIONS", "LIST_EXTENSIONS", "TABLE_EXTENSIONS", "Item", "list_images"]

IMAGE_EXTENSIONS = frozenset({
    ".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".dib", ".webp", ".tif",
    ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico",
})
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".list"})
TABLE_EXTENSIONS = frozenset({".parquet", ".csv", ".tsv"})
_GLOB_CHARS = frozenset("*?[")


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
    if not inputs:
        raise InputError("no inputs given; pass folders, globs, path lists or tables")
    items: list[Item] = []
    for source in inputs:
        found = _one_input(os.fspath(source), path_column)
        if not found:
            raise InputError(f"{source}: no images found (looked for "
                             f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
        items.extend(found)
    return _unique(items)


def _one_input(source: str, path_column: str) -> list[Item]:
    path = Path(source)
    if path.is_dir():
        return _folder(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in LIST_EXTENSIONS:
            return _path_list(path)
        if suffix in TABLE_EXTENSIONS:
            return _table(path, path_column)
        return [Item(path.name, str(path))]
    if _GLOB_CHARS & set(source):
        return _glob(source)
    if path.exists() or os.path.lexists(path):
        raise InputError(f"{source}: cannot read it (not a file or folder, or a broken link)")
    raise InputError(f"{source}: no such file or folder")


def _folder(root: Path) -> list[Item]:
    """Images under ``root``, recursively; hidden files and folders (``.name``) skipped."""
    def fail(error: OSError) -> None:
        raise InputError(f"{root}: cannot list {error.filename}: {error.strerror}; fix its "
                         "permissions or leave it out") from error

    found = []
    for folder, dirs, files in os.walk(root, onerror=fail):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS:
                full = os.path.join(folder, name)
                found.append(Item(Path(os.path.relpath(full, root)).as_posix(), full))
    return sorted(found, key=lambda item: item.id)


def _glob(pattern: str) -> list[Item]:
    parts = Path(pattern).parts
    fixed = next((i for i, part in enumerate(parts) if _GLOB_CHARS & set(part)), len(parts))
    root = Path(*parts[:fixed]) if fixed else Path(".")
    files = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    if not files:
        raise InputError(f"{pattern}: no file matches this pattern")
    items = [Item(Path(os.path.relpath(p, root)).as_posix(), p) for p in files]
    return sorted(items, key=lambda item: item.id)


def _resolve(entries: Iterable[str], root: Path) -> list[Item]:
    """Paths as written in a list or table: relative ones are relative to ``root``."""
    items = []
    for entry in entries:
        path = Path(entry)
        full = path if path.is_absolute() else root / path
        try:
            ident = full.relative_to(root) if path.is_absolute() else path
        except ValueError:
            ident = path
        items.append(Item(Path(os.path.normpath(ident)).as_posix(), str(full)))
    return items


def _path_list(path: Path) -> list[Item]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read this path list ({exc})") from exc
    return _resolve((line.strip() for line in lines if line.strip()), path.parent)


def _table(path: Path, path_column: str) -> list[Item]:
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() == ".parquet":
            names = pq.read_schema(path).names
            if path_column not in names:
                table = pa.table({name: [] for name in names})
            else:
                table = pq.read_table(path, columns=[c for c in (path_column, "id")
                                                     if c in names])
        else:
            delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
            table = pa.csv.read_csv(path, parse_options=pa.csv.ParseOptions(delimiter=delimiter),
                                    convert_options=pa.csv.ConvertOptions(
                                        strings_can_be_null=False))
    except (OSError, pa.ArrowException) as exc:
        raise InputError(f"{path}: cannot read this table ({exc})") from exc
    if path_column not in table.column_names:
        raise InputError(f"{path}: no column {path_column!r}; its columns are "
                         f"{', '.join(table.column_names)}. Name the column of image paths "
                         "with --path-column")
    paths = [str(p) for p in table.column(path_column).to_pylist() if p not in (None, "")]
    items = _resolve(paths, path.parent)
    if "id" in table.column_names and path_column != "id":
        ids = [str(i) for i, p in zip(table.column("id").to_pylist(),
                                      table.column(path_column).to_pylist(), strict=True)
               if p not in (None, "")]
        items = [Item(ident, item.path) for ident, item in zip(ids, items, strict=True)]
    return items


def _unique(items: list[Item]) -> list[Item]:
    """Drop repeats of the same file; two different files with one id is an error."""
    seen: dict[str, str] = {}
    unique, clashes = [], []
    for item in items:
        other = seen.get(item.id)
        if other is None:
            seen[item.id] = item.path
            unique.append(item)
        elif os.path.normpath(other) != os.path.normpath(item.path):
            clashes.append(f"{item.id} ({other} and {item.path})")
    if clashes:
        raise InputError(f"{len(clashes)} ids name two different files: "
                         f"{summarize_names(clashes, 3)}. Ids are paths relative to each "
                         "input; pass the common parent folder once, or give a table with an "
                         "'id' column")
    return unique
