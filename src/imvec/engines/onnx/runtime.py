"""The ONNX Runtime engine: a network exported once per size and output kind, run by an
ONNX Runtime CPU session."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from torch import nn

from imvec._io import atomic_path
from imvec.engines.fast import fast_network
from imvec.engines.fusion import portable_ops
from imvec.engines.onnx.cache import cache_path, prune_onnx_cache
from imvec.engines.onnx.graphs import (
    INSTALL,
    ONNX_OPSET,
    HubGraph,
    NetGraph,
    align_for_this_cpu,
    example_input,
    export_onnx,
)
from imvec.engines.threads import allow_spinning, compute_threads

__all__ = ["OnnxRuntimeNet", "onnxruntime_session"]

_EXPORT_LOCK = threading.RLock()
EXPORT_WAIT_S = 900  # how long a process waits for another's export of the same entry


@contextlib.contextmanager
def _cache_entry_lock(cached: Path | None) -> Iterator[None]:
    """Held while one process looks up or exports a cache entry; where the cache cannot be
    locked (read-only, or another process holds it too long) each process just exports."""
    if cached is None:
        yield
        return
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(cached.with_name(f".{cached.name}.lock")), timeout=EXPORT_WAIT_S)
        lock.acquire()
    except (OSError, Timeout):
        yield
        return
    try:
        yield
    finally:
        lock.release()


def onnxruntime_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session with all graph optimizations and ``threads`` intra-op
    threads (default: the thread policy's, :func:`imvec.engines.threads.compute_threads`),
    whose idle threads sleep unless ``$IMVEC_ALLOW_SPINNING=1``."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError(f"the onnxruntime engine needs {INSTALL}") from e
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or compute_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning",
                                     "1" if allow_spinning() else "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class OnnxRuntimeNet:
    """A plain network run by ONNX Runtime: ``engine(x, end_points=None, pre_logits=False)``
    with ``x`` NCHW in the network's range, as the fast graph takes it, or
    ``engine(x, unit_range=True)`` with ``x`` in [0, 1], scaled to the network's range in
    the graph: ONNX Runtime does that on all its threads, where numpy would take one core
    (and compete with ONNX Runtime's spinning threads right after the previous call): 4%
    of MobileNet V1 0.5/160 at batch 16, 12% at batch 1.

    Exports the network once per output kind (features / logits) and image size, with a
    dynamic batch but a fixed size, so that ONNX Runtime sees constant paddings it can fold
    into its convolutions. The exported graph takes NHWC: a module's images arrive in that
    layout (``x`` is their NCHW view), so they reach ONNX Runtime without a copy, and its
    first convolution reads them in place. Its channel counts are padded to this CPU's
    blocked layout (:mod:`imvec.engines.onnx.nchwc`). Exports of networks under 1 GiB are kept in
    ``$IMVEC_HOME/onnx``, keyed by the weights, the architecture and the versions, so the
    next process starts at once. End points are not available.
    """

    def __init__(self, net: nn.Module, threads: int | None = None) -> None:
        self.net, self.threads = net, threads
        self._sessions: dict[tuple[bool, int, int, bool], Any] = {}

    def _session(self, pre_logits: bool, size: tuple[int, int], unit_range: bool) -> Any:
        key = (pre_logits, *size, unit_range)
        session = self._sessions.get(key)
        if session is None:
            # threads: one export at a time in a process (torch's exporter keeps global
            # state), and the others then find the session made
            with _EXPORT_LOCK:
                session = self._sessions.get(key)
                if session is None:
                    session = self._sessions[key] = self._load_or_export(pre_logits, size,
                                                                           unit_range)
        return session

    def _load_or_export(self, pre_logits: bool, size: tuple[int, int], unit_range: bool) -> Any:
        cached = cache_path(self.net, pre_logits, size, unit_range)
        with _cache_entry_lock(cached):  # processes: one exports, the others load its file
            if cached is not None and cached.is_file():
                try:
                    session = onnxruntime_session(cached, self.threads)
                    with contextlib.suppress(OSError):
                        os.utime(cached)  # recently used: pruned last
                    return session
                except Exception:  # noqa: BLE001 (a damaged cache entry: export again)
                    cached.unlink(missing_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "net.onnx"
                fast = fast_network(self.net)
                graph = (HubGraph(fast, pre_logits, nhwc_stem=True) if unit_range
                         else NetGraph(fast, pre_logits, nhwc=True))
                example = example_input("images" if unit_range else "x_nhwc", size)
                with torch.no_grad(), portable_ops(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    export_onnx(graph, example, "x", False, path, ONNX_OPSET)
                align_for_this_cpu(path)
                session = onnxruntime_session(path, self.threads)
                if cached is not None:
                    try:
                        cached.parent.mkdir(parents=True, exist_ok=True)
                        with atomic_path(cached, durable=False) as partial:
                            shutil.copyfile(path, partial)
                        prune_onnx_cache(cached.parent, keep=cached)
                    except OSError:  # a read-only or full cache only costs the next export
                        pass
                    except ValueError as exc:  # a bad limit must not cost the export
                        warnings.warn(f"{exc}; the ONNX cache was not pruned", RuntimeWarning,
                                      stacklevel=2)
        return session

    def __call__(self, x: torch.Tensor, end_points: dict | None = None,
                 pre_logits: bool = False, unit_range: bool = False) -> torch.Tensor:
        if end_points is not None:
            raise ValueError("the onnxruntime engine returns no end points; use engine='fast'")
        # numpy views, not torch ones: right after a call each torch op costs ~30 us
        nhwc = x.numpy(force=True).transpose(0, 2, 3, 1)  # a view, where x came from a module
        return self.run_nhwc(nhwc, pre_logits, unit_range)

    def run_nhwc(self, images: np.ndarray, pre_logits: bool = False,
                 unit_range: bool = False) -> torch.Tensor:
        """The output for NHWC ``images`` in numpy (in [0, 1] with ``unit_range``)."""
        session = self._session(pre_logits, (int(images.shape[1]), int(images.shape[2])),
                                unit_range)
        (out,) = session.run(None, {"x": np.ascontiguousarray(images, dtype=np.float32)})
        return torch.from_numpy(out)
