"""The graphs ONNX Runtime runs, and their export: the fast graph (:mod:`imvec.engines.fast`)
in standard ops only (:func:`imvec.engines.fusion.portable_ops`) behind TF-Hub's calling
convention (NHWC in [0, 1]) or the plain network's (NCHW in its own range), with a first
convolution that reads NHWC images in place."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imvec.engines.fusion import FusedConv, fused_conv2d, portable_same_pads
from imvec.engines.onnx.nchwc import align_channels, nchwc_block

__all__ = ["ONNX_OPSET", "HubGraph", "NetGraph", "align_for_this_cpu", "example_input",
           "export_onnx"]

ONNX_OPSET = 18
INSTALL = "pip install 'imvec[onnx]' (onnx, onnxscript, onnxruntime)"
ONNX_MAX_PROTO_BYTES = 1 << 30  # protobuf stops at 2 GiB: larger graphs carry external data


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


class HubGraph(nn.Module):
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


class NetGraph(nn.Module):
    """The plain network's convention: NCHW in the network's range (``nhwc``: NHWC, read
    in place by the first convolution)."""

    def __init__(self, fast: nn.Module, pre_logits: bool, nhwc: bool = False) -> None:
        super().__init__()
        self.fast, self.pre_logits, self.nhwc = fast, pre_logits, nhwc
        if nhwc:
            _with_nhwc_stem(fast, unit_range=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fast(x.permute(0, 3, 1, 2) if self.nhwc else x, None, self.pre_logits)



def example_input(graph_input: str, size: tuple[int, int], batch: int = 2) -> torch.Tensor:
    h, w = size
    if graph_input == "images":
        return torch.rand(batch, h, w, 3)
    if graph_input == "x_nhwc":
        return torch.rand(batch, h, w, 3) * 2 - 1
    return torch.rand(batch, 3, h, w) * 2 - 1



class _NoTorchvisionNotice(logging.Filter):
    """torch's ONNX exporter logs a warning for each torchvision op it cannot register when
    torchvision is not installed (as beside imvec's CPU torch); the graphs use none."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("torchvision is not installed")


_EXPORTER_REGISTRY_LOG = "torch.onnx._internal.exporter._registration"


def export_onnx(graph: nn.Module, example: torch.Tensor, name: str, variable: bool,
                 path: Path, opset: int) -> None:
    try:
        import onnxscript  # noqa: F401  (torch's ONNX exporter needs it)
    except ImportError as e:
        raise ImportError(f"ONNX export needs onnxscript: {INSTALL}") from e
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


def align_for_this_cpu(path: Path) -> None:
    """Channel counts padded to this CPU's NCHWc block (:mod:`.nchwc`), in place."""
    block = nchwc_block()
    if block > 1:
        import onnx

        model = align_channels(onnx.load(str(path)), block)
        external = model.ByteSize() > ONNX_MAX_PROTO_BYTES  # protobuf stops at 2 GiB
        onnx.save(model, str(path), save_as_external_data=external,
                  location=f"{path.name}.data" if external else None)

