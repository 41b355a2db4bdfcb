"""Channel counts padded to ONNX Runtime's NCHWc block, in an exported ONNX graph.

On x86 ONNX Runtime runs convolutions, pools and adds in a blocked layout (8 channels per
block with AVX2, 16 with AVX-512), but only where every tensor's channel count is a multiple
of the block; elsewhere it reorders to NCHW and back around plain kernels. NASNet's 44, 88
and 168 filters (PNASNet's 216, the stems' 11, 22, 42) miss the 16-channel block, so its
concatenations, additions and ReLUs ran in NCHW between 77 reorders per call (NASNet-mobile,
batch 16): the same network with 48 filters ran 18% faster than with 44.

:func:`align_channels` gives every convolution a multiple of the block output channels with
zero weights and biases, so the extra channels stay exactly zero through ReLU, pools, adds
and concatenations, and the consumers read the real channels where they now lie (their
weights get zero rows for the padding). Where a tensor meets an operation this pass does not
know, and at the graph's outputs, the real channels are gathered back in order.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["align_channels", "nchwc_block"]

# operations for which zero channels in give zero channels out, channel by channel
_ELEMENTWISE = {"Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool",
                "Identity"}
_BINARY = {"Add", "Sub", "Mul", "Max", "Min", "Sum"}  # f(0, 0) == 0


def nchwc_block() -> int:
    """ONNX Runtime's NCHWc block on this CPU: 16 with AVX-512, 8 with AVX2 (x86), and 1
    (no blocked layout, nothing to align) elsewhere."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return 1
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return 8
    return 16 if re.search(r"\bavx512f\b", flags) else 8


@dataclass(frozen=True)
class _Layout:
    """Where a padded tensor keeps its real channels (axis 1)."""

    positions: np.ndarray  # the padded index of each real channel, in order
    width: int  # padded channel count
    rank: int

    def same(self, other: _Layout | None) -> bool:
        return (other is not None and self.width == other.width and self.rank == other.rank
                and np.array_equal(self.positions, other.positions))


def align_channels(model: Any, block: int) -> Any:
    """``model`` (an ``onnx.ModelProto``, changed in place and returned) with its
    convolutions' output channels padded to multiples of ``block``; its outputs unchanged."""
    if block <= 1:
        return model
    placements: dict[str, _Layout] = {}
    for _ in range(8):  # each round settles the adds whose operands were placed apart
        asked = _Aligner(model, block, placements).visit_all()
        if not asked:
            break
        placements.update(asked)
    return _Aligner(model, block, placements, assemble=True).rebuild()


class _Aligner:
    """One pass over the graph. ``placements``: layouts chosen for convolutions' outputs
    where an add meets them with another operand's layout (asked by an earlier pass).
    Nodes are copied as they are changed, and only ``rebuild`` writes into the model."""

    def __init__(self, model: Any, block: int, placements: dict[str, _Layout],
                 assemble: bool = False) -> None:
        import onnx
        from onnx import numpy_helper

        self.onnx, self.numpy_helper = onnx, numpy_helper
        self.model, self.block, self.placements = model, block, placements
        self.assemble = assemble
        graph = model.graph
        self.producers = {out: node for node in graph.node for out in node.output}
        self.initializers = {t.name: t for t in graph.initializer}
        if not graph.value_info:
            graph = onnx.shape_inference.infer_shapes(model).graph
        self.shapes = {v.name: [d.dim_value if d.HasField("dim_value") else None
                                for d in v.type.tensor_type.shape.dim]
                       for v in (*graph.input, *graph.value_info, *graph.output)}
        self.asked: dict[str, _Layout] = {}
        self.layouts: dict[str, _Layout] = {}
        self.gathered: dict[str, str] = {}
        self.nodes: list[Any] = []
        self.new_initializers: list[Any] = []
        self.renamed = {o.name: f"{o.name}__aligned" for o in model.graph.output}

    def visit_all(self) -> dict[str, _Layout]:
        """The placements this pass asks for (empty: the graph is settled)."""
        for original in self.model.graph.node:
            node = self.onnx.NodeProto()
            node.CopyFrom(original)
            for i, name in enumerate(node.input):
                node.input[i] = self.renamed.get(name, name)
            for i, name in enumerate(node.output):
                node.output[i] = self.renamed.get(name, name)
            self._visit(node)
        for name, inner in self.renamed.items():  # the outputs: real channels, in order
            self.nodes.append(self.onnx.helper.make_node("Identity", [self._real(inner)],
                                                         [name]))
        return self.asked

    def rebuild(self) -> Any:
        self.visit_all()
        graph = self.model.graph
        used = {name for node in self.nodes for name in node.input}
        kept = [t for t in graph.initializer if t.name in used]
        del graph.node[:], graph.initializer[:]
        graph.node.extend(self.nodes)
        graph.initializer.extend(kept + self.new_initializers)
        del graph.value_info[:]  # channel counts changed: ONNX Runtime infers them again
        return self.model

    # -- helpers -------------------------------------------------------------------------
    def _constant(self, name: str, value: np.ndarray) -> str:
        self.new_initializers.append(self.numpy_helper.from_array(value, name))
        return name

    def _value(self, name: str) -> np.ndarray | None:
        tensor = self.initializers.get(name)
        return None if tensor is None else self.numpy_helper.to_array(tensor)

    def _real(self, name: str) -> str:
        """``name`` with its real channels only, in order (a Gather where it was padded)."""
        layout = self.layouts.get(name)
        if layout is None:
            return name
        if name not in self.gathered:
            indices = self._constant(f"{name}__real_channels", layout.positions.astype(np.int64))
            self.gathered[name] = f"{name}__real"
            self.nodes.append(self.onnx.helper.make_node(
                "Gather", [name, indices], [self.gathered[name]], axis=1))
        return self.gathered[name]

    def _keep(self, node: Any) -> None:
        """An operation this pass does not look into: it gets real channels."""
        for i, name in enumerate(node.input):
            if name:
                node.input[i] = self._real(name)
        self.nodes.append(node)

    def _attribute(self, node: Any, name: str, default: Any) -> Any:
        for attribute in node.attribute:
            if attribute.name == name:
                return self.onnx.helper.get_attribute_value(attribute)
        return default

    def _set_attribute(self, node: Any, name: str, value: Any) -> None:
        for attribute in node.attribute:
            if attribute.name == name:
                node.attribute.remove(attribute)
                break
        node.attribute.append(self.onnx.helper.make_attribute(name, value))

    def _channels(self, name: str) -> _Layout | None:
        """The layout of ``name``, padded or not (None: its channel count is unknown)."""
        if name in self.layouts:
            return self.layouts[name]
        shape = self.shapes.get(name)
        if not shape or len(shape) < 2 or shape[1] is None:
            return None
        return _Layout(np.arange(shape[1]), shape[1], len(shape))

    def _channel_axes(self, node: Any, axes_input: int, rank: int) -> set[int] | None:
        """The axes a Slice / Reduce touches, made non-negative (None: unknown)."""
        if len(node.input) > axes_input and node.input[axes_input]:
            axes = self._value(node.input[axes_input])
            if axes is None:
                return None
        else:
            axes = self._attribute(node, "axes", None)
            if axes is None:
                return set(range(rank))
        return {int(a) % rank for a in np.atleast_1d(axes)}

    # -- the operations ------------------------------------------------------------------
    def _visit(self, node: Any) -> None:
        op = node.op_type
        inputs = [self.layouts.get(name) for name in node.input]
        if node.domain not in ("", "ai.onnx") or not any(inputs) and op != "Conv":
            self.nodes.append(node)
            return
        same_operands = op in _BINARY and len(node.input) >= 2 and all(
            layout is not None and layout.same(inputs[0]) for layout in inputs)
        if op == "Conv":
            self._conv(node)
        elif (op in _ELEMENTWISE and len(node.output) == 1 or same_operands
              or op == "Clip" and self._zero_preserving_clip(node)):
            self._pass_through(node, inputs[0])
        elif op in _BINARY and self._place_apart(node):
            self._keep(node)  # for this pass; the next places the operands alike
        elif op == "Concat":
            self._concat(node)
        elif op in ("Slice", "ReduceMean", "ReduceMax") and inputs[0] is not None:
            layout = inputs[0]
            axes_input = 3 if op == "Slice" else 1
            axes = self._channel_axes(node, axes_input, layout.rank)
            keepdims = op == "Slice" or self._attribute(node, "keepdims", 1)
            if axes is None or 1 in axes or not keepdims and axes != set(range(2, layout.rank)):
                self._keep(node)
            else:
                self._pass_through(node, layout if keepdims else _Layout(
                    layout.positions, layout.width, 2))
        else:
            self._keep(node)

    def _place_apart(self, node: Any) -> bool:
        """Where an add's operands lie apart, the layout of one that no convolution placed
        (e.g. a concatenation's) is asked of the convolutions behind the others."""
        layouts = [self._channels(name) for name in node.input]
        if any(layout is None for layout in layouts):
            return False
        convs = [self._conv_behind(name) for name in node.input]
        # a layout no convolution chose wins, then one already asked for, then the widest
        target = max(zip(layouts, convs, strict=True), key=lambda pair: (
            pair[1] is None, pair[1] in self.placements, pair[0].width))[0]
        asked = False
        for layout, conv in zip(layouts, convs, strict=True):
            if conv is not None and not layout.same(target) and conv not in self.placements:
                self.asked[conv] = target
                asked = True
        return asked

    def _conv_behind(self, name: str) -> str | None:
        """The convolution (no groups) whose output reaches ``name`` through ops that keep
        each channel where it is, if any."""
        node = self.producers.get(name)
        while node is not None and (node.op_type in _ELEMENTWISE or node.op_type == "Clip"):
            node = self.producers.get(node.input[0])
        if node is None or node.op_type != "Conv" or self._attribute(node, "group", 1) != 1:
            return None
        return node.output[0]

    def _pass_through(self, node: Any, layout: _Layout) -> None:
        self.nodes.append(node)
        self.layouts[node.output[0]] = layout

    def _zero_preserving_clip(self, node: Any) -> bool:
        """Clip keeps zeros where its bounds are constants around 0 (absent: unbounded)."""
        bounds = zip(node.input[1:3], (np.less_equal, np.greater_equal), strict=False)
        for name, keeps_zero in bounds:
            value = self._value(name) if name else None
            if name and (value is None or not keeps_zero(value, 0)):
                return False
        return True

    def _conv(self, node: Any) -> None:
        weight_name = node.input[1]
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if weight_name not in self.initializers or bias_name and (
                bias_name not in self.initializers):
            self._keep(node)
            return
        shape = tuple(self.initializers[weight_name].dims)
        layout = self.layouts.get(node.input[0])
        group = self._attribute(node, "group", 1)
        out_channels = shape[0]
        if group == 1 and (layout is None or shape[1] == len(layout.positions)):
            padded = -(-out_channels // self.block) * self.block
            out_layout = self.placements.get(node.output[0],
                                             _Layout(np.arange(out_channels), padded, 4))
            if layout is None and out_layout.width == out_channels:
                self.nodes.append(node)
                return
            in_layout = layout or _Layout(np.arange(shape[1]), shape[1], 4)
            new_shape = (out_layout.width, in_layout.width, *shape[2:])
            where = np.ix_(out_layout.positions, in_layout.positions)
        elif layout is not None and group == out_channels == len(layout.positions) \
                and shape[1] == 1:  # depthwise: each channel stays where it is
            self._set_attribute(node, "group", layout.width)
            out_layout, new_shape, where = layout, (layout.width, *shape[1:]), layout.positions
        else:
            self._keep(node)
            return
        if self.assemble:
            new_weight = np.zeros(new_shape, np.float32)
            new_weight[where] = self._value(weight_name)
            node.input[1] = self._constant(f"{weight_name}__aligned{len(self.nodes)}",
                                           new_weight)
            if bias_name:
                new_bias = np.zeros(new_shape[0], np.float32)
                new_bias[out_layout.positions] = self._value(bias_name)
                node.input[2] = self._constant(f"{bias_name}__aligned{len(self.nodes)}",
                                               new_bias)
        self.nodes.append(node)
        if out_layout.width != len(out_layout.positions) or not np.array_equal(
                out_layout.positions, np.arange(out_layout.width)):
            self.layouts[node.output[0]] = out_layout

    def _concat(self, node: Any) -> None:
        layouts = [self._channels(name) for name in node.input]
        axis = self._attribute(node, "axis", 0)
        if any(layout is None for layout in layouts) or axis % layouts[0].rank != 1:
            self._keep(node)
            return
        offsets = np.cumsum([0] + [layout.width for layout in layouts])
        positions = np.concatenate([layout.positions + offset
                                    for layout, offset in zip(layouts, offsets[:-1], strict=True)])
        self.nodes.append(node)
        if offsets[-1] != len(positions):
            self.layouts[node.output[0]] = _Layout(positions, int(offsets[-1]), layouts[0].rank)
