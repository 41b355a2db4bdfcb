"""Labelled images for fine-tuning: where they come from, how they are split and augmented.

A dataset is an image folder (one sub-folder per class) or a CSV / Parquet table of
(path, label). Pixels come from the one image pipeline of :mod:`imvec.data`: evaluation
takes the central 87.5% crop (as TF-Slim's eval did) exactly as ``imvec extract --crop``
and ``imvec predict`` make it; training takes TF-Slim's Inception crop and flip
(:mod:`imvec.data.augment`) on the same resize. Every random choice is drawn from
``(seed, epoch, index)``, so an example's augmentation does not depend on workers, ranks
or resumption.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from imvec.data.augment import AUGMENTATION, augment
from imvec.data.decode import ImageDecodeError, decode_rgb
from imvec.data.preprocess import RESIZE_METHOD, Preprocessing

__all__ = ["EVAL_CENTRAL_FRACTION", "IMAGE_SUFFIXES", "PIXELS", "ImageDataset",
           "LabeledImages", "read_dataset", "stratified_split"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
EVAL_CENTRAL_FRACTION = 0.875
# What makes an example's pixels (part of the feature cache's key).
PIXELS = {"resize": RESIZE_METHOD, "augment": AUGMENTATION}


@dataclass(frozen=True)
class LabeledImages:
    """Image paths with integer labels indexing ``class_names``."""

    paths: tuple[str, ...]
    labels: tuple[int, ...]
    class_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices: list[int]) -> LabeledImages:
        return LabeledImages(tuple(self.paths[i] for i in indices),
                             tuple(self.labels[i] for i in indices), self.class_names)


def read_dataset(
    source: str | os.PathLike,
    *,
    path_column: str = "path",
    label_column: str = "label",
    class_names: tuple[str, ...] | None = None,
) -> LabeledImages:
    """An image folder, ``.csv`` or ``.parquet`` as labelled images.

    Classes are the sorted folder names or label values, unless ``class_names`` fixes
    them (a validation set must use the training set's classes). Relative paths in a
    table are relative to the table's folder.
    """
    source = Path(source)
    if source.is_dir():
        pairs = _folder_pairs(source)
    elif source.suffix.lower() in (".csv", ".parquet"):
        pairs = _table_pairs(source, path_column, label_column)
    elif not source.exists():
        raise FileNotFoundError(f"no such dataset: {source} (give an image folder with one "
                                "sub-folder per class, or a .csv / .parquet of path,label)")
    else:
        raise ValueError(f"{source}: a dataset is a folder (one sub-folder per class) or a "
                         f".csv / .parquet table of {path_column},{label_column}; got a "
                         f"{source.suffix or 'suffix-less'} file")
    if not pairs:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise ValueError(f"{source} holds no images (looked for {suffixes})")
    found = sorted({label for _, label in pairs})
    if class_names is None:
        class_names = tuple(found)
        if len(class_names) < 2:
            raise ValueError(f"{source} has {len(class_names)} class ({found}); a classifier "
                             "needs at least two")
    unknown = sorted(set(found) - set(class_names))
    if unknown:
        raise ValueError(f"{source} has labels that the training data lacks: {unknown[:10]}")
    index = {name: i for i, name in enumerate(class_names)}
    return LabeledImages(tuple(p for p, _ in pairs), tuple(index[lab] for _, lab in pairs),
                         tuple(class_names))


def _folder_pairs(root: Path) -> list[tuple[str, str]]:
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no sub-folders; put each class's images in its own "
                         f"sub-folder ({root}/<class name>/<image>)")
    pairs, empty = [], []
    for folder in classes:
        images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                        and p.is_file() and not p.name.startswith("."))
        if not images:
            empty.append(folder.name)
        pairs += [(str(p), folder.name) for p in images]
    if empty:
        raise ValueError(f"class folder(s) without images in {root}: {empty[:10]}; remove them "
                         "or add images")
    return pairs


def _table_pairs(table: Path, path_column: str, label_column: str) -> list[tuple[str, str]]:
    if table.suffix.lower() == ".csv":
        with open(table, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            rows = list(reader) if {path_column, label_column} <= set(columns) else []
        paths = [r[path_column] for r in rows]
        labels = [r[label_column] for r in rows]
    else:
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise ImportError("reading Parquet needs pyarrow: pip install pyarrow") from exc
        columns = pq.read_schema(table).names
        data = (pq.read_table(table, columns=[path_column, label_column]).to_pydict()
                if {path_column, label_column} <= set(columns) else {})
        paths, labels = data.get(path_column, []), data.get(label_column, [])
    missing = [c for c in (path_column, label_column) if c not in columns]
    if missing:
        raise ValueError(f"{table} lacks column(s) {missing}; it has {columns}. Name them "
                         "with --path-column / --label-column")
    blank = [i for i, (p, lab) in enumerate(zip(paths, labels, strict=True))
             if p in (None, "") or lab in (None, "")]
    if blank:
        raise ValueError(f"{table}: empty path or label in row(s) {[i + 1 for i in blank[:10]]}")
    base = table.parent
    return [(str(base / p) if not os.path.isabs(p) else p, str(lab))
            for p, lab in zip(paths, labels, strict=True)]


def stratified_split(
    images: LabeledImages, val_fraction: float, seed: int
) -> tuple[LabeledImages, LabeledImages]:
    """(train, validation): ``val_fraction`` of each class, at least one example of each
    class with two or more, chosen by ``seed``."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    labels = np.asarray(images.labels)
    for c in range(len(images.class_names)):
        members = np.flatnonzero(labels == c)
        rng.shuffle(members)
        n_val = 0 if val_fraction == 0 else max(1 if len(members) > 1 else 0,
                                                round(len(members) * val_fraction))
        val += members[:n_val].tolist()
        train += members[n_val:].tolist()
    return images.subset(sorted(train)), images.subset(sorted(val))


class ImageDataset(torch.utils.data.Dataset):
    """``(float32 [H, W, 3] in [0, 1], label, index)`` per example: the module's input. An
    undecodable image gives zeros and the label -1, which the loss and the metrics ignore
    (the trainer lists such files)."""

    def __init__(self, images: LabeledImages, size: tuple[int, int], *, augment: bool,
                 seed: int = 0, central_fraction: float = EVAL_CENTRAL_FRACTION) -> None:
        self.images, self.size, self.augment, self.seed = images, size, augment, seed
        self.central_fraction = central_fraction
        self.eval_preprocessing = Preprocessing(tuple(size), central_fraction)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        path = self.images.paths[index]
        try:
            if self.augment:
                rng = np.random.default_rng([self.seed, self.epoch, index])
                pixels = augment(decode_rgb(path), self.eval_preprocessing.size, rng)
            else:
                pixels = self.eval_preprocessing(path)
        except ImageDecodeError:
            return torch.zeros(*self.size, 3), -1, index
        return torch.from_numpy(pixels), self.images.labels[index], index
