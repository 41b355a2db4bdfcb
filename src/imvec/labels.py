"""Class names for classifier outputs, and the top-k reading of logits.

The TF-Hub ``/classification/`` modules output 1001 logits: index 0 is a "background"
class that TF-Slim's ImageNet training added in front of the 1000 ILSVRC-2012 classes
(synset order). ``imagenet_labels()`` is that list (TF's ``ImageNetLabels.txt``: the first
WordNet lemma of each synset, so "crane" and "maillot" each appear twice).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from importlib.resources import files

import torch

__all__ = ["IMAGENET_NUM_CLASSES", "imagenet_labels", "top_k"]

IMAGENET_NUM_CLASSES = 1001


@lru_cache(maxsize=1)
def _imagenet_labels() -> tuple[str, ...]:
    text = files("imvec.data").joinpath("imagenet_labels.txt").read_text(encoding="utf-8")
    labels = tuple(text.splitlines())
    if len(labels) != IMAGENET_NUM_CLASSES:  # a broken install, not a user error
        raise RuntimeError(f"imvec/data/imagenet_labels.txt has {len(labels)} lines, expected "
                           f"{IMAGENET_NUM_CLASSES}; reinstall imvec")
    return labels


def imagenet_labels() -> list[str]:
    """The 1001 labels of the TF-Hub ImageNet classifiers; index 0 is "background"."""
    return list(_imagenet_labels())


def top_k(
    logits: torch.Tensor, k: int, class_names: Sequence[str] | None = None
) -> list[list[tuple[str, float]]]:
    """Per row of ``logits`` [B, C], the ``k`` most probable (name, softmax probability).

    Without names, the class index (as a string) stands in for the name.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [batch, classes], got shape {list(logits.shape)}")
    if class_names is not None and len(class_names) != logits.shape[1]:
        raise ValueError(f"{len(class_names)} class names for {logits.shape[1]} logits")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    probs = torch.softmax(logits.detach().float(), dim=1)
    values, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    names = class_names if class_names is not None else [str(i) for i in range(probs.shape[1])]
    return [[(names[i], float(p)) for p, i in zip(row_p.tolist(), row_i.tolist(), strict=True)]
            for row_p, row_i in zip(values, indices, strict=True)]
