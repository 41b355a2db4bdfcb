"""Labelled images for fine-tuning: where they come from, how they are split and augmented.

A dataset is an image folder (one sub-folder per class) or a CSV / Parquet table of
(path, label). Augmentation takes the crop and flip of TF-Slim's Inception preprocessing,
which trained these networks: a random crop covering 5-100% of the image with aspect ratio
3/4-4/3, resized to the module's size, and a random horizontal flip (its colour distortion
is left out). Evaluation takes the central 87.5% crop,
as TF-Slim's eval did. Every random choice is drawn from ``(seed, epoch, index)``, so an
example's augmentation does not depend on workers, ranks or resumption.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from imvec.data.decode import ImageDecodeError, open_image

__all__ = ["IMAGE_SUFFIXES", "ImageDataset", "LabeledImages", "center_crop", "read_dataset",
           "random_resized_crop", "stratified_split"]

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
CROP_AREA = (0.05, 1.0)  # TF-Slim inception_preprocessing.distorted_bounding_box_crop
CROP_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 100
EVAL_CENTRAL_FRACTION = 0.875


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


def random_resized_crop(
    image: Image.Image, size: tuple[int, int], rng: np.random.Generator
) -> Image.Image:
    """Inception-style crop: area and aspect ratio drawn until the box fits, else the
    whole image; then resized (bilinear) to ``size`` (height, width)."""
    width, height = image.size
    area = width * height
    box = (0, 0, width, height)
    for _ in range(CROP_ATTEMPTS):
        target = area * rng.uniform(*CROP_AREA)
        ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
        w = round(math.sqrt(target * ratio))
        h = round(math.sqrt(target / ratio))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            box = (left, top, left + w, top + h)
            break
    return image.resize((size[1], size[0]), Image.BILINEAR, box=box)


def center_crop(
    image: Image.Image, size: tuple[int, int], fraction: float = EVAL_CENTRAL_FRACTION
) -> Image.Image:
    """The central ``fraction`` of each side, resized (bilinear) to ``size``."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"central crop fraction must be in (0, 1], got {fraction}")
    width, height = image.size
    w, h = width * fraction, height * fraction
    box = ((width - w) / 2, (height - h) / 2, (width + w) / 2, (height + h) / 2)
    return image.resize((size[1], size[0]), Image.BILINEAR, box=box)


class ImageDataset(torch.utils.data.Dataset):
    """``(uint8 [H, W, 3], label)`` per example; an undecodable image gives zeros and the
    label -1, which the loss and the metrics ignore (the trainer lists such files)."""

    def __init__(self, images: LabeledImages, size: tuple[int, int], *, augment: bool,
                 seed: int = 0, central_fraction: float = EVAL_CENTRAL_FRACTION) -> None:
        self.images, self.size, self.augment, self.seed = images, size, augment, seed
        self.central_fraction = central_fraction
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        try:
            image = open_image(self.images.paths[index])
        except ImageDecodeError:
            return torch.zeros(*self.size, 3, dtype=torch.uint8), -1, index
        if self.augment:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            image = random_resized_crop(image, self.size, rng)
            if rng.random() < 0.5:
                image = ImageOps.mirror(image)
        else:
            image = center_crop(image, self.size, self.central_fraction)
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()), \
            self.images.labels[index], index
