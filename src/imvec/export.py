"""Export to ONNX and TorchScript, and the ONNX Runtime engine.

What is exported is the inference graph (:mod:`imvec.nets.fast`: BN folded, each relu
once) written with standard ops only (:func:`imvec.nets.fusion.portable_ops`), so any
ONNX runtime or PyTorch build runs it. A module exports with TF-Hub's contract: input
``images`` ``[batch, height, width, 3]`` float32 in [0, 1], output ``default``
(features, or logits for a classification module). The batch is dynamic, and so are
height and width where the card allows other sizes (MobileNet V1).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imvec.nchwc import align_channels, nchwc_block
from imvec.nets.fast import fast_network
from imvec.nets.fusion import FusedConv, fused_conv2d, portable_ops, portable_same_pads

__all__ = ["FORMATS", "OnnxRuntimeNet", "export", "onnxruntime_session"]

FORMATS = ("onnx", "torchscript")
ONNX_OPSET = 18
_INSTALL = "pip install 'imvec[onnx]' (onnx, onnxscript, onnxruntime)"


class _NhwcStem(nn.Module):
    """A network's first convolution reading NHWC images in place, for ONNX Runtime.

    ``[B, H, W, 3]`` is viewed (no copy) as one-channel ``[B, 1, H, 3W]`` images, and the
    ``k x k`` stride-``s`` convolution as a ``k x 3k`` stride-``(s, 3s)`` one over them:
    the same products, without the NHWC -> NCHW transpose ONNX Runtime otherwise makes of
    every batch (MobileNet V1 0.5/160 at batch 16, with the scaling below: 2-9% faster,
    by the machine's phase). With ``unit_range`` it reads [0, 1] images and scales them in the
    convolution: ``conv(2x - 1, W) + b = conv(x, 2W) + b - sum(W)`` where no padding is
    read (the NASNets' 'VALID' stems); under 'SAME' padding, whose zeros stand for -1,
    ``conv(x - 0.5, 2W) + b`` gives the products of ``2x - 1`` bit for bit (scaling by 2
    is exact) in one pass over the images instead of two.
    """

    def __init__(self, conv: FusedConv, unit_range: bool) -> None:
        super().__init__()
        out, channels, kh, kw = conv.weight.shape
        if conv.groups != 1:
            raise ValueError("the NHWC stem takes a dense first convolution")
        self.same = conv.tf_padding == "SAME"
        weight, bias = conv.weight, conv.bias
        if unit_range:
            weight = conv.weight * 2.0
            if not self.same:
                folded = -conv.weight.double().sum(dim=(1, 2, 3))
                bias = (folded if bias is None else bias.double() + folded).to(weight.dtype)
        self.register_buffer("weight", weight.permute(0, 2, 3, 1).reshape(
            out, 1, kh, kw * channels).contiguous())
        self.register_buffer("bias", bias)
        self.kernel_size, self.stride = (kh, kw), conv.stride
        self.shift = unit_range and self.same

    def forward(self, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
        images = x.permute(0, 2, 3, 1)  # x is the NCHW view of NHWC images
        batch, height, width, channels = images.shape
        if self.shift:
            images = images - 0.5
        flat = images.reshape(batch, 1, height, width * channels)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        if self.same:
            left, right = portable_same_pads(width, kw, sw)
            flat = F.pad(flat, (left * channels, right * channels,
                                *portable_same_pads(height, kh, sh)))
        return fused_conv2d(flat, self.weight, self.bias, (sh, sw * channels), (0, 0),
                            activation=activation, portable=True)


def _with_nhwc_stem(fast: nn.Module, unit_range: bool) -> nn.Module:
    """``fast`` with its first convolution (the first FusedConv registered) reading NHWC."""
    name = next(n for n, m in fast.named_modules() if isinstance(m, FusedConv))
    parent, _, child = name.rpartition(".")
    stem = fast.get_submodule(name)
    setattr(fast.get_submodule(parent), child, _NhwcStem(stem, unit_range))
    return fast


class _HubGraph(nn.Module):
    """TF-Hub's calling convention around an inference graph: NHWC [0, 1] in.
    ``nhwc_stem`` (for ONNX): the first convolution reads the images in place."""

    def __init__(self, fast: nn.Module, pre_logits: bool, nhwc_stem: bool = False) -> None:
        super().__init__()
        self.fast, self.pre_logits = fast, pre_logits
        if nhwc_stem:
            _with_nhwc_stem(fast, unit_range=True)
        self.scale = not nhwc_stem

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.scale:
            images = images * 2.0 - 1.0
        return self.fast(images.permute(0, 3, 1, 2), None, self.pre_logits)


class _NetGraph(nn.Module):
    """The plain network's convention: NCHW in the network's range (``nhwc``: NHWC, read
    in place by the first convolution)."""

    def __init__(self, fast: nn.Module, pre_logits: bool, nhwc: bool = False) -> None:
        super().__init__()
        self.fast, self.pre_logits, self.nhwc = fast, pre_logits, nhwc
        if nhwc:
            _with_nhwc_stem(fast, unit_range=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fast(x.permute(0, 3, 1, 2) if self.nhwc else x, None, self.pre_logits)


def _graph(model: nn.Module, format: str) -> tuple[nn.Module, tuple[int, int], bool, str]:
    """(graph to export, example size, variable size?, input name) of a Module or a net."""
    from imvec.module import Module

    if isinstance(model, Module):
        card = model.card
        pre_logits = card.variant == "feature_vector"
        graph = _HubGraph(fast_network(model.net), pre_logits, nhwc_stem=format == "onnx")
        return graph, card.input_size, card.variable_input_size, "images"
    from imvec.nets.mobilenet_v1 import MobileNetV1

    variable = isinstance(model, MobileNetV1)
    return _NetGraph(fast_network(model), False), (224, 224), variable, "x"


def _example(graph_input: str, size: tuple[int, int], batch: int = 2) -> torch.Tensor:
    h, w = size
    if graph_input == "images":
        return torch.rand(batch, h, w, 3)
    if graph_input == "x_nhwc":
        return torch.rand(batch, h, w, 3) * 2 - 1
    return torch.rand(batch, 3, h, w) * 2 - 1


def export(model: nn.Module, path: str | os.PathLike, format: str = "onnx", *,
           input_size: tuple[int, int] | None = None, opset: int = ONNX_OPSET) -> Path:
    """Write ``model`` (an :class:`imvec.Module`, or a plain network) to ``path``.

    ``input_size`` is the (height, width) the graph is traced at; it defaults to the
    card's (224x224 for a plain network). Batch is always dynamic; height and width are
    too for MobileNet V1. A plain network exports ``x`` (NCHW, its own range) -> its
    output (logits if it has a classifier).
    """
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    graph, size, variable, name = _graph(model, format)
    size = tuple(input_size or size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = _example(name, size)
    # Written in a scratch folder beside the target, then moved: a half-written file never
    # takes the final name, and ONNX's external-data file (models over 2 GB) moves along.
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as scratch:
        tmp = Path(scratch) / path.name
        with torch.no_grad(), portable_ops(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation chatter
            if format == "onnx":
                _export_onnx(graph, example, name, variable, tmp, opset)
            else:
                traced = torch.jit.trace(graph, example, check_trace=False)
                torch.jit.save(traced, str(tmp))
        for produced in Path(scratch).iterdir():
            os.replace(produced, path.parent / produced.name)
    return path


class _NoTorchvisionNotice(logging.Filter):
    """torch's ONNX exporter logs a warning for each torchvision op it cannot register when
    torchvision is not installed (as beside imvec's CPU torch); the graphs use none."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("torchvision is not installed")


_EXPORTER_REGISTRY_LOG = "torch.onnx._internal.exporter._registration"


def _export_onnx(graph: nn.Module, example: torch.Tensor, name: str, variable: bool,
                 path: Path, opset: int) -> None:
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as e:
        raise ImportError(f"ONNX export needs onnxscript: {_INSTALL}") from e
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1, max=4096)}
    if variable:
        hw = (1, 2) if name == "images" else (2, 3)
        dims[hw[0]] = torch.export.Dim("height", min=32, max=4096)
        dims[hw[1]] = torch.export.Dim("width", min=32, max=4096)
    registry_log, notice = logging.getLogger(_EXPORTER_REGISTRY_LOG), _NoTorchvisionNotice()
    registry_log.addFilter(notice)
    try:
        program = torch.onnx.export(graph, (example,), dynamo=True, input_names=[name],
                                    output_names=["default"], dynamic_shapes=({**dims},),
                                    opset_version=opset, optimize=True, verbose=False)
    finally:
        registry_log.removeFilter(notice)
    program.save(str(path))


def _align_for_this_cpu(path: Path) -> None:
    """Channel counts padded to this CPU's NCHWc block (:mod:`imvec.nchwc`), in place."""
    block = nchwc_block()
    if block > 1:
        import onnx

        model = align_channels(onnx.load(str(path)), block)
        external = model.ByteSize() > ONNX_CACHE_MAX_BYTES  # protobuf stops at 2 GiB
        onnx.save(model, str(path), save_as_external_data=external,
                  location=f"{path.name}.data" if external else None)


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


def _cache_path(net: nn.Module, pre_logits: bool, size: tuple[int, int],
                unit_range: bool = False) -> Path | None:
    """Where the export of ``net`` at ``size`` is cached (None: too large to cache)."""
    from imvec import __version__
    from imvec.weights.store import home

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


def onnxruntime_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session with all graph optimizations and ``threads`` intra-op
    threads (default: PyTorch's thread count, i.e. the physical cores)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError(f"the onnxruntime engine needs {_INSTALL}") from e
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
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
    blocked layout (:mod:`imvec.nchwc`). Exports of networks under 1 GiB are kept in
    ``$IMVEC_HOME/onnx``, keyed by the weights, the architecture and the versions, so the
    next process starts at once. End points are not available.
    """

    def __init__(self, net: nn.Module, threads: int | None = None) -> None:
        self.net, self.threads = net, threads
        self._sessions: dict[tuple[bool, int, int, bool], Any] = {}

    def _session(self, pre_logits: bool, size: tuple[int, int], unit_range: bool) -> Any:
        key = (pre_logits, *size, unit_range)
        if key not in self._sessions:
            cached = _cache_path(self.net, pre_logits, size, unit_range)
            if cached is not None and cached.is_file():
                try:
                    self._sessions[key] = onnxruntime_session(cached, self.threads)
                    with contextlib.suppress(OSError):
                        os.utime(cached)  # recently used: pruned last
                    return self._sessions[key]
                except Exception:  # noqa: BLE001 (a damaged cache entry: export again)
                    cached.unlink(missing_ok=True)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "net.onnx"
                fast = fast_network(self.net)
                graph = (_HubGraph(fast, pre_logits, nhwc_stem=True) if unit_range
                         else _NetGraph(fast, pre_logits, nhwc=True))
                example = _example("images" if unit_range else "x_nhwc", size)
                with torch.no_grad(), portable_ops(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    _export_onnx(graph, example, "x", False, path, ONNX_OPSET)
                _align_for_this_cpu(path)
                self._sessions[key] = onnxruntime_session(path, self.threads)
                if cached is not None:
                    try:
                        cached.parent.mkdir(parents=True, exist_ok=True)
                        partial = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
                        shutil.copyfile(path, partial)
                        os.replace(partial, cached)
                        prune_onnx_cache(cached.parent, keep=cached)
                    except OSError:  # a read-only or full cache only costs the next export
                        pass
                    except ValueError as exc:  # a bad limit must not cost the export
                        warnings.warn(f"{exc}; the ONNX cache was not pruned", RuntimeWarning,
                                      stacklevel=2)
        return self._sessions[key]

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
