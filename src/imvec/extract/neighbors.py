"""Exact nearest images by cosine similarity, reading the index a chunk at a time.

Memory holds one chunk of the index plus the ``k`` best per query, so an index larger than
memory is searched as easily as a small one. The query images go through the model and the
preprocessing recorded in the index, so their vectors are comparable.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from imvec.data.preprocess import Preprocessing
from imvec.errors import ImvecError
from imvec.extract.arrow import list_values
from imvec.extract.sink import OutputPaths, read_metadata

__all__ = ["Neighbor", "nearest", "neighbors"]


@dataclass(frozen=True)
class Neighbor:
    id: str
    path: str
    score: float


def _chunks(index: Path, rows: int) -> Iterator[tuple[list[str], list[str], np.ndarray]]:
    if index.suffix == ".npy":
        features = np.load(index, mmap_mode="r")
        with open(OutputPaths.for_output(index, "npy").ids, newline="", encoding="utf-8") as f:
            table = list(csv.reader(f))[1:]
        for start in range(0, len(table), rows):
            part = table[start:start + rows]
            yield ([r[0] for r in part], [r[1] for r in part],
                   np.asarray(features[start:start + rows], np.float32))
        return
    with pq.ParquetFile(str(index)) as parquet:  # by path: see arrow.read_columns
        for batch in parquet.iter_batches(batch_size=rows, columns=["id", "path", "feature"]):
            yield (batch.column(0).to_pylist(), batch.column(1).to_pylist(),
                   list_values(batch.column(2)))


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return vectors / np.where(norms > 0, norms, 1)


def nearest(index: str | os.PathLike, queries: np.ndarray, k: int = 10,
            chunk_rows: int = 65536) -> list[list[Neighbor]]:
    """The ``k`` rows of ``index`` most similar (cosine) to each query vector, best first."""
    if k < 1:
        raise ValueError(f"k must be at least 1; got {k}")
    queries = _unit(np.atleast_2d(np.asarray(queries, np.float32)))
    best_scores = np.empty((len(queries), 0), np.float32)
    best_rows: list[list[tuple[str, str]]] = [[] for _ in queries]
    for ids, paths, features in _chunks(Path(index), chunk_rows):
        if features.shape[1] != queries.shape[1]:
            raise ImvecError(f"{index} holds {features.shape[1]}-dim vectors; the queries "
                             f"have {queries.shape[1]}")
        scores = np.concatenate([best_scores, queries @ _unit(features).T], axis=1)
        candidates = [rows + list(zip(ids, paths, strict=True)) for rows in best_rows]
        keep = min(k, scores.shape[1])
        order = np.argsort(-scores, axis=1, kind="stable")[:, :keep]
        best_scores = np.take_along_axis(scores, order, axis=1)
        best_rows = [[c[j] for j in o] for c, o in zip(candidates, order.tolist(), strict=True)]
    return [[Neighbor(i, p, float(s)) for (i, p), s in zip(rows, scores, strict=True)]
            for rows, scores in zip(best_rows, best_scores, strict=True)]


def neighbors(query_images: Sequence[str | os.PathLike], index: str | os.PathLike,
              k: int = 10, model=None, engine: str | None = None) -> list[list[Neighbor]]:
    """Nearest images in ``index`` to each query image, embedded as the index was;
    ``engine``: the inference engine, as :class:`~imvec.extract.ExtractJob` takes it."""
    from imvec.extract.provenance import load_module, weights_sha256

    record = read_metadata(index)
    source = record["model"]["source"]
    if model is None:
        model = source if Path(source).is_file() else record["model"]["handle"]
    module = load_module(model, engine=engine)
    if weights_sha256(module) != record["model"]["weights_sha256"]:
        raise ImvecError(f"{index} was made with weights sha256 "
                         f"{record['model']['weights_sha256']}, but {module.source} has "
                         f"{weights_sha256(module)}; pass the index's model with --model")
    preprocessing = Preprocessing.from_record(record["preprocessing"])
    import torch

    images = np.stack([preprocessing(path) for path in query_images])
    with torch.inference_mode():
        vectors = module(images).numpy()
    return nearest(index, vectors, k)
