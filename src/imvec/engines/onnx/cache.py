"""The cache of ONNX exports under ``$IMVEC_HOME/onnx``: keyed by the weights, the
architecture and the versions, pruned by least recent use."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from imvec._paths import home
from imvec._version import __version__
from imvec.engines.onnx.graphs import ONNX_OPSET
from imvec.engines.onnx.nchwc import nchwc_block

__all__ = ["ONNX_CACHE_MAX_BYTES", "cache_path", "prune_onnx_cache"]

ONNX_CACHE_MAX_BYTES = 1 << 30  # larger exports carry external data files: not cached
ENV_ONNX_CACHE_GB = "IMVEC_ONNX_CACHE_GB"
DEFAULT_ONNX_CACHE_GB = 4.0  # each network, size and weights version is one 4-360 MB file
_GRAPH_FORM = "nhwc-stem"  # in the cache key: a change of the exported graph re-exports


def prune_onnx_cache(folder: Path, keep: Path | None = None,
                     limit_gb: float | None = None) -> list[Path]:
    """Delete the least recently used exports until the folder holds at most ``limit_gb``
    (default ``$IMVEC_ONNX_CACHE_GB``, else 4); ``keep`` stays. Returns what was deleted.
    Exports are rebuilt on demand (seconds), so nothing of value is lost."""
    if limit_gb is None:
        try:
            limit_gb = float(os.environ.get(ENV_ONNX_CACHE_GB, DEFAULT_ONNX_CACHE_GB))
        except ValueError as exc:
            raise ValueError(f"${ENV_ONNX_CACHE_GB} must be a number of GB, e.g. 4; got "
                             f"{os.environ[ENV_ONNX_CACHE_GB]!r}") from exc
    entries = []
    for path in folder.glob("*.onnx"):
        with contextlib.suppress(OSError):  # another process may be pruning too
            stat = path.stat()
            entries.append((stat.st_mtime, stat.st_size, path))
    total, deleted = sum(size for _, size, _ in entries), []
    for _, size, path in sorted(entries):
        if total <= limit_gb * 2**30:
            break
        if path != keep:
            with contextlib.suppress(OSError):
                path.unlink()
                deleted.append(path)
                total -= size
    return deleted


def cache_path(net: nn.Module, pre_logits: bool, size: tuple[int, int],
                unit_range: bool = False) -> Path | None:
    """Where the export of ``net`` at ``size`` is cached (None: too large to cache)."""
    tensors = net.state_dict()
    if sum(t.numel() * t.element_size() for t in tensors.values()) > ONNX_CACHE_MAX_BYTES:
        return None
    digest = hashlib.sha256(f"{__version__} {torch.__version__} {ONNX_OPSET} {pre_logits} "
                            f"{size} {_GRAPH_FORM} nchwc{nchwc_block()} "
                            f"{'unit ' if unit_range else ''}{net!r}".encode())
    for name, tensor in tensors.items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return home() / "onnx" / f"{digest.hexdigest()[:40]}.onnx"

