"""TF checkpoint -> self-describing safetensors file, and back to a network.

The safetensors metadata carries the card: registry name, network family,
hyper-parameters, whether logits are present, and the source with its sha256, so
``imvec.load(file)`` needs nothing else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from imvec._io import atomic_path
from imvec.errors import CheckpointMismatchError, ImvecError
from imvec.registry import Card, find_card
from imvec.weights.mapping import load_tf_variables
from imvec.weights.tf_checkpoint import CheckpointReader

__all__ = ["FORMAT", "convert_checkpoint", "convert_tensors", "read_metadata", "load_converted",
           "save_converted",
           "sha256_of_files", "LOGITS_PREFIXES", "class_names"]

FORMAT = "imvec-weights/1"
LOGITS_PREFIXES = ("final_layer/FC/", "MobilenetV1/Logits/Conv2d_1c_1x1/")


def sha256_of_files(paths: list[Path]) -> str:
    """One sha256 over the files' bytes, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def convert_checkpoint(
    prefix: str | os.PathLike,
    arch: str,
    output: str | os.PathLike,
    hparams: dict[str, Any] | None = None,
    source: str | None = None,
) -> Path:
    """Read a TF checkpoint for registry model ``arch`` (+ ``hparams``), write safetensors.

    The logits layer is kept when the checkpoint has it. Returns the output path.
    """
    with CheckpointReader(prefix) as reader:
        twins = any(k.endswith("/ExponentialMovingAverage") for k in reader)
        return convert_tensors(reader, arch, output, hparams,
                               source=source or str(Path(prefix)),
                               source_sha256=sha256_of_files(reader.files),
                               values="raw" if twins else "as saved")


def convert_tensors(
    tensors: Mapping[str, np.ndarray] | CheckpointReader,
    arch: str,
    output: str | os.PathLike,
    hparams: dict[str, Any] | None = None,
    *,
    source: str,
    source_sha256: str,
    values: str = "",
) -> Path:
    """TF-named tensors (a reader, or any mapping, read one tensor at a time) -> safetensors.

    ``source`` and ``source_sha256`` (what the tensors came from: URL or path, and the sha256
    of the downloaded file or of the checkpoint files) go into the metadata, with ``values``
    (``weights_values``: "raw", "ema" or "as saved", see :mod:`imvec.weights.sources`).
    """
    card = find_card(arch)
    hparams = {**card.hparams, **(hparams or {})}
    if isinstance(tensors, CheckpointReader):
        tensors = _ReaderMapping(tensors)
    has_logits = any(k.startswith(LOGITS_PREFIXES) for k in tensors)
    with torch.device("meta"):  # no random weights: the checkpoint's become the network's
        net = card.build(**hparams) if not has_logits else _build(card, hparams, 1001)
    load_tf_variables(net, tensors)
    metadata = {
        "format": FORMAT,
        "arch": card.short_name,
        "network": card.network,
        "hparams": json.dumps(hparams, sort_keys=True),
        "num_classes": "1001" if has_logits else "",
        "source": source,
        "source_sha256": source_sha256,
        "weights_values": values,
    }
    return save_converted(net, output, metadata)


class _ReaderMapping(Mapping):
    """A checkpoint as a read-on-access mapping, so conversion holds one copy of the weights."""

    def __init__(self, reader: CheckpointReader):
        self._reader = reader

    def __getitem__(self, name: str):
        return self._reader.read(name)

    def __iter__(self):
        return iter(self._reader.keys())

    def __len__(self) -> int:
        return len(self._reader)

    def __contains__(self, name: object) -> bool:
        return name in self._reader


def _build(card: Card, hparams: dict[str, Any], num_classes: int | None) -> nn.Module:
    from imvec.registry import build_network

    return build_network(card.network, num_classes=num_classes, **hparams)


def save_converted(net: nn.Module, output: str | os.PathLike, metadata: dict[str, str]) -> Path:
    """Write ``net``'s tensors (PyTorch layout) atomically, with ``metadata``."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()
               if not k.endswith("num_batches_tracked")}
    with atomic_path(output) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return output


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise ImvecError(f"{path} is not a readable safetensors file ({exc})") from exc
    if metadata.get("format") != FORMAT:
        raise ImvecError(f"{path} was not written by `imvec convert` (no {FORMAT!r} metadata); "
                         "convert the original TF checkpoint with `imvec convert`")
    return metadata


def class_names(metadata: dict[str, str]) -> list[str] | None:
    """The ``class_names`` metadata (JSON list) of a fine-tuned classifier, else None."""
    return json.loads(metadata["class_names"]) if metadata.get("class_names") else None


def load_converted(
    path: str | os.PathLike, with_logits: bool | None = None
) -> tuple[nn.Module, Card, dict]:
    """Build the network described by a converted file and fill it (memory-mapped read).

    ``with_logits=False`` leaves a logits layer in the file unused; ``None`` keeps it only
    for a fine-tuned classifier (a file with ``class_names``). The card's ``num_classes``
    follows the file.
    """
    metadata = read_metadata(path)
    if with_logits is None:
        with_logits = class_names(metadata) is not None
    card = find_card(metadata["arch"], "classification" if with_logits else None)
    if with_logits and not metadata.get("num_classes"):
        raise ValueError(f"{path} holds no logits layer (a feature-vector checkpoint); load it "
                         "with variant='feature_vector'")
    hparams = json.loads(metadata["hparams"])
    num_classes = int(metadata["num_classes"]) if with_logits else None
    if num_classes and num_classes != card.num_classes:
        card = dataclasses.replace(card, num_classes=num_classes)
    with torch.device("meta"):
        net = _build(card, hparams, num_classes)
    expected = {k for k in net.state_dict() if not k.endswith("num_batches_tracked")}
    with safe_open(str(path), framework="pt") as f:
        available = set(f.keys())
        missing = expected - available
        if missing:
            raise CheckpointMismatchError(f"{path} lacks {len(missing)} tensor(s) of "
                                          f"{metadata['arch']}: {sorted(missing)[:10]}")
        state = {k: f.get_tensor(k) for k in expected}
    for name, buffer in net.named_buffers():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.zeros((), dtype=buffer.dtype)
    net.load_state_dict(state, strict=True, assign=True)
    return net, card, metadata
