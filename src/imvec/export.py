"""Export to ONNX and TorchScript, and the ONNX Runtime engine.

What is exported is the inference graph (:mod:`imvec.engines.fast`: BN folded, each relu
once) written with standard ops only (:func:`imvec.engines.fusion.portable_ops`), so any
ONNX runtime or PyTorch build runs it. A module exports with TF-Hub's contract: input
``images`` ``[batch, height, width, 3]`` float32 in [0, 1], output ``default``
(features, or logits for a classification module). The batch is dynamic, and so are
height and width where the card allows other sizes (MobileNet V1).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from imvec.engines.fast import fast_network
from imvec.engines.fusion import portable_ops
from imvec.engines.onnx.graphs import ONNX_OPSET, HubGraph, NetGraph, example_input, export_onnx
from imvec.engines.onnx.runtime import OnnxRuntimeNet, onnxruntime_session
from imvec.module import Module
from imvec.nets.mobilenet_v1 import MobileNetV1

__all__ = ["FORMATS", "OnnxRuntimeNet", "export", "onnxruntime_session"]

FORMATS = ("onnx", "torchscript")


def _graph(model: nn.Module, format: str) -> tuple[nn.Module, tuple[int, int], bool, str]:
    """(graph to export, example size, variable size?, input name) of a Module or a net."""
    if isinstance(model, Module):
        card = model.card
        pre_logits = card.variant == "feature_vector"
        graph = HubGraph(fast_network(model.net), pre_logits, nhwc_stem=format == "onnx")
        return graph, card.input_size, card.variable_input_size, "images"
    variable = isinstance(model, MobileNetV1)
    return NetGraph(fast_network(model), False), (224, 224), variable, "x"


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
    example = example_input(name, size)
    # Written in a scratch folder beside the target, then moved: a half-written file never
    # takes the final name, and ONNX's external-data file (models over 2 GB) moves along.
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{path.name}.") as scratch:
        tmp = Path(scratch) / path.name
        with torch.no_grad(), portable_ops(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation chatter
            if format == "onnx":
                export_onnx(graph, example, name, variable, tmp, opset)
            else:
                traced = torch.jit.trace(graph, example, check_trace=False)
                torch.jit.save(traced, str(tmp))
        for produced in Path(scratch).iterdir():
            os.replace(produced, path.parent / produced.name)
    return path

