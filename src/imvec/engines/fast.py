"""Inference graphs derived from the faithful networks: same numbers, less memory traffic.

:func:`fast_network` builds a NEW module from a faithful network (which it never changes):

- every BN is folded into the convolution before it (both halves of a factorized
  reduction fold their slice of the shared BN);
- tensors stay channels_last, which oneDNN's 1x1 and depthwise kernels run fastest on;
- the activation after a convolution, and the add that closes a NAS combination, run
  inside the convolution (oneDNN post-ops);
- a NAS cell computes ``relu`` of a hidden state once, however many operations read it,
  and hands the next cells its output already relu'd (every consumer relus it first); the
  raw output is made only when something reads it raw (an end point, an identity input);
- the factorized reduction's one-pixel shift is a padded, strided 1x1 convolution
  instead of a padded copy of its input; 3x3 stride-1 max pooling is two passes of
  elementwise maxima.

Kernel-level choices (weight packing, asymmetric padding, small 1x1s as matmuls) live in
:mod:`imvec.engines.fusion`.

The graphs hold buffers, not parameters: they are for inference. Training, fine-tuning and
``variable_map`` keep using the faithful network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from imvec.engines.fusion import FusedConv, is_portable
from imvec.nets.cells import Bottleneck1x7, Cell, Identity, Pool, SeparableStack
from imvec.nets.mobilenet_v1 import MIN_INPUT_SIZE, ConvBNRelu6, Depthwise, MobileNetV1
from imvec.nets.nas import NASNetwork
from imvec.nets.ops import avg_pool_same, max_pool_same

__all__ = ["FastMobileNetV1", "FastNASNetwork", "fast_network"]

RAW, RELU = "raw", "relu"


class Value:
    """A hidden state in up to two forms: as computed (``raw``) and ``relu(raw)``.

    Either may be made first; ``relu`` is derived from ``raw`` on demand, once.
    """

    __slots__ = ("raw", "_relu")

    def __init__(self, raw: torch.Tensor | None = None, relu: torch.Tensor | None = None):
        self.raw, self._relu = raw, relu

    @property
    def relu(self) -> torch.Tensor:
        if self._relu is None:
            self._relu = F.relu(self.raw)
        return self._relu

    def form(self, form: str) -> torch.Tensor:
        if form == RELU:
            return self.relu
        if self.raw is None:
            raise RuntimeError("internal error: a raw state was needed but only its relu was made")
        return self.raw


def _activation(forms: set[str]) -> str:
    """Fuse relu into the producer when nothing needs the raw value."""
    return "relu" if forms == {RELU} else "none"


def _as_value(tensor: torch.Tensor, activation: str) -> Value:
    return Value(relu=tensor) if activation == "relu" else Value(raw=tensor)


# -- cell operations: each takes its input in ``input_form``; ``fusable`` ones end in a
# -- convolution that can also apply the combination's add and the output's relu.

class FastSeparable(nn.Module):
    """relu -> (depthwise -> pointwise+BN) x N, with the inner relus fused."""

    input_form, fusable = RELU, True

    def __init__(self, stack: SeparableStack):
        super().__init__()
        children = list(stack.children())
        convs = []
        for i in range(0, len(children), 3):  # relu, separable conv, BN
            sep, bn = children[i + 1], children[i + 2]
            convs += [FusedConv(sep.depthwise), FusedConv(sep.pointwise, bn)]
        self.convs = nn.ModuleList(convs)

    def forward(self, x: torch.Tensor, activation: str = "none",
                add: torch.Tensor | None = None) -> torch.Tensor:
        *inner, last = self.convs
        for i, conv in enumerate(inner):
            x = conv(x, "relu" if i % 2 else "none")  # pointwise (odd) + BN + next relu
        return last(x, activation, add)


class FastBottleneck(nn.Module):
    """AmoebaNet's relu -> 1x1 -> 1x7 -> 7x1 -> 1x1, each with its BN and the next relu."""

    input_form, fusable = RELU, True

    def __init__(self, block: Bottleneck1x7):
        super().__init__()
        m = dict(block.named_children())
        self.convs = nn.ModuleList([
            FusedConv(m["pre_1x1"], m["pre_bn"]), FusedConv(m["1x7"], m["bn_1x7_7x1"]),
            FusedConv(m["7x1"], m["bn"]), FusedConv(m["post_1x1"], m["post_bn"])])

    def forward(self, x: torch.Tensor, activation: str = "none",
                add: torch.Tensor | None = None) -> torch.Tensor:
        for conv in self.convs[:-1]:
            x = conv(x, "relu")
        return self.convs[-1](x, activation, add)


class FastPool(nn.Module):
    """TF 'SAME' pooling, then the projection 1x1 + BN when channels differ."""

    input_form = RAW

    def __init__(self, pool: Pool):
        super().__init__()
        self.max = pool.pool is max_pool_same
        self.kernel, self.stride = pool.kernel, pool.stride
        self.project = FusedConv(getattr(pool, "1x1"), pool.bn_1) if pool.project else None
        self.fusable = self.project is not None
        self.portable = False  # standard pooling ops only (see portable_ops)

    def forward(self, x: torch.Tensor, activation: str = "none",
                add: torch.Tensor | None = None) -> torch.Tensor:
        fast_max = self.max and self.kernel == 3 and self.stride == 1
        if fast_max and not (self.portable or is_portable()):
            x = _max_pool_3x3(x)
        else:
            x = (max_pool_same if self.max else avg_pool_same)(x, self.kernel, self.stride)
        return x if self.project is None else self.project(x, activation, add)


def _max_pool_3x3(x: torch.Tensor) -> torch.Tensor:
    """TF's 3x3 stride-1 'SAME' max pool as two separable passes of elementwise maxima:
    up to 4x faster than PyTorch's pooling kernel, which also computes argmax indices."""
    rows = x.clone()
    torch.maximum(rows[..., 1:], x[..., :-1], out=rows[..., 1:])
    torch.maximum(rows[..., :-1], x[..., 1:], out=rows[..., :-1])
    out = rows.clone()
    torch.maximum(out[..., 1:, :], rows[..., :-1, :], out=out[..., 1:, :])
    torch.maximum(out[..., :-1, :], rows[..., 1:, :], out=out[..., :-1, :])
    return out


class FastIdentity(nn.Module):
    """'none': the input itself, or relu -> strided 1x1 + BN."""

    def __init__(self, op: Identity):
        super().__init__()
        self.project = FusedConv(getattr(op, "1x1"), op.bn_1) if op.project else None
        self.fusable = self.project is not None
        self.input_form = RELU if self.fusable else RAW

    def forward(self, x: torch.Tensor, activation: str = "none",
                add: torch.Tensor | None = None) -> torch.Tensor:
        return x if self.project is None else self.project(x, activation, add)


def _fast_op(op: nn.Module) -> nn.Module:
    for kind, fast in ((SeparableStack, FastSeparable), (Bottleneck1x7, FastBottleneck),
                       (Pool, FastPool), (Identity, FastIdentity)):
        if isinstance(op, kind):
            return fast(op)
    raise TypeError(f"no fast version of cell operation {type(op).__name__}")


class FastReduction(nn.Module):
    """A 1x1 conv + BN, or TF's factorized reduction: two stride-2 1x1 convs on pixel grids
    offset by one, concatenated (each half with its slice of the shared BN folded in).

    The second grid (TF: pad bottom/right by one, drop the first row and column, take
    every second pixel) is a 1x1 conv with stride 2 and padding 1 whose first output row
    and column are dropped: the same pixels, and the same zero row past an odd edge,
    without copying the input.
    """

    def __init__(self, conv1: nn.Module, conv2: nn.Module | None, bn: nn.BatchNorm2d):
        super().__init__()
        half = conv1.out_channels
        self.path1 = FusedConv(conv1, bn, slice(0, half))
        self.path2 = None if conv2 is None else FusedConv(conv2, bn, slice(half, None))
        if self.path2 is not None:
            self.path1.stride = self.path2.stride = (2, 2)

    def forward(self, x: torch.Tensor, activation: str = "none") -> torch.Tensor:
        p1 = self.path1(x, activation)
        if self.path2 is None:
            return p1
        p2 = self.path2(x, activation, padding=(1, 1))
        return torch.cat([p1, p2[:, :, 1:, 1:]], dim=1)


@dataclass(frozen=True)
class _CombPlan:
    left: int
    right: int
    fuse: str | None  # "left", "right" or None: which side's last conv does the add
    activation: str  # "relu" when only relu(state) is needed


@dataclass(frozen=True)
class _CellPlan:
    begin_act: str
    prev_act: str
    combs: tuple[_CombPlan, ...]
    out_forms: tuple[tuple[int, str], ...]  # (state, activation of its reduction if any)
    net_needs_raw: bool
    prev_needs_raw: bool


class FastCell(nn.Module):
    """One NAS cell as a small dataflow program over :class:`Value` states."""

    def __init__(self, cell: Cell):
        super().__init__()
        self.genotype, self.prev_mode = cell.genotype, cell.prev_mode
        self.begin = FusedConv(getattr(cell, "1x1"), cell.beginning_bn)
        if cell.prev_mode == "factorized":
            self.prev = FastReduction(cell.path1_conv, cell.path2_conv, cell.final_path_bn)
        elif cell.prev_mode == "project":
            self.prev = FastReduction(cell.prev_1x1, None, cell.prev_bn)
        self.ops = nn.ModuleList()
        for i in range(len(cell.genotype.combs)):
            comb = getattr(cell, f"comb_iter_{i}")
            self.ops.append(nn.ModuleList([_fast_op(comb.left), _fast_op(comb.right)]))
        self.reductions = nn.ModuleDict()
        for key, red in cell.cell_output.items():
            if red.stride == 1:
                self.reductions[key] = FastReduction(red.path_conv, None, red.path_bn)
            else:
                self.reductions[key] = FastReduction(red.path1_conv, red.path2_conv,
                                                     red.final_path_bn)
        self._plans = {raw: self._plan(raw) for raw in (False, True)}

    def _plan(self, raw_output: bool) -> _CellPlan:
        """Which form of each state the cell must make, and where relu and add fuse."""
        combs = self.genotype.combs
        needs: list[set[str]] = [set() for _ in range(2 + len(combs))]
        for (left, right), (_, li, _, ri) in zip(self.ops, combs, strict=True):
            needs[li].add(left.input_form)
            needs[ri].add(right.input_form)
        out_forms = []
        for index in self.genotype.concat:
            if f"reduction_{index}" in self.reductions:
                needs[index].add(RAW)
                out_forms.append((index, "none" if raw_output else "relu"))
            else:
                needs[index].update({RELU, RAW} if raw_output else {RELU})
                out_forms.append((index, ""))
        plans = []
        for i, (left, right) in enumerate(self.ops):
            fuse = "left" if left.fusable else "right" if right.fusable else None
            _, li, _, ri = combs[i]
            plans.append(_CombPlan(li, ri, fuse, _activation(needs[2 + i])))
        mode = self.prev_mode
        return _CellPlan(
            begin_act=_activation(needs[0]),
            prev_act=_activation(needs[1]) if mode in ("factorized", "project") else "none",
            combs=tuple(plans), out_forms=tuple(out_forms),
            net_needs_raw=mode == "none" and RAW in needs[1],
            prev_needs_raw=mode == "identity" and RAW in needs[1],
        )

    def input_needs(self, raw_output: bool) -> tuple[bool, bool]:
        """(net, prev): whether this cell reads that input's raw form."""
        plan = self._plans[raw_output]
        return plan.net_needs_raw, plan.prev_needs_raw

    def forward(self, net: Value, prev: Value | None, raw_output: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(relu(output), output or None): the cell's output, concatenated."""
        plan = self._plans[raw_output]
        states = [_as_value(self.begin(net.relu, plan.begin_act), plan.begin_act)]
        if self.prev_mode == "none":
            states.append(net)
        elif self.prev_mode == "identity":
            states.append(prev)
        else:
            states.append(_as_value(self.prev(prev.relu, plan.prev_act), plan.prev_act))
        for (left, right), comb in zip(self.ops, plan.combs, strict=True):
            a, b = states[comb.left], states[comb.right]
            if comb.fuse is None:
                y = left(a.form(left.input_form)) + right(b.form(right.input_form))
                states.append(Value(relu=y.relu_()) if comb.activation == "relu"
                              else Value(raw=y))
                continue
            (fused, x), (other, o) = ((left, a), (right, b))[::1 if comb.fuse == "left" else -1]
            addend = other(o.form(other.input_form))
            y = fused(x.form(fused.input_form), comb.activation, addend)
            states.append(_as_value(y, comb.activation))
        relu_parts, raw_parts = [], []
        for index, activation in plan.out_forms:
            if activation:
                y = self.reductions[f"reduction_{index}"](states[index].raw, activation)
                state = _as_value(y, activation)
            else:
                state = states[index]
            relu_parts.append(state.relu)
            if raw_output:
                raw_parts.append(state.raw)
        relu = torch.cat(relu_parts, dim=1)
        return relu, torch.cat(raw_parts, dim=1) if raw_output else None


class FastNASNetwork(nn.Module):
    """The inference graph of a :class:`NASNetwork` (NASNet-A, PNASNet-5, AmoebaNet-A).

    ``forward(x)`` equals the faithful ``net(x)`` in eval mode; ``forward(x, end_points,
    pre_logits)`` also fills ``end_points`` with the raw cell outputs (NCHW), as
    ``net.forward_features`` does.
    """

    def __init__(self, net: NASNetwork):
        super().__init__()
        stem = getattr(net, net.stem_scope) if net.stem_scope else net
        self.stem = FusedConv(stem.conv0, stem.conv0_bn)
        self.cells = nn.ModuleList([FastCell(getattr(net, s.name)) for s in net._steps])
        self._steps = [(s.prev, s.end_point) for s in net._steps]
        self.num_features, self.num_classes = net.num_features, net.num_classes
        fc = getattr(net.final_layer, "FC", None)
        self.fc = None if fc is None else _Linear(fc.weight, fc.bias)

    def _raw_needed(self, end_points: bool) -> list[bool]:
        """Per output ([None, stem, cell 0, ...]): must its raw form be made?"""
        need = [False] * (len(self._steps) + 2)
        for k in reversed(range(len(self._steps))):
            prev, end_point = self._steps[k]
            out = k + 2
            need[out] |= end_points and end_point is not None
            net_raw, prev_raw = self.cells[k].input_needs(need[out])
            need[out - 1] |= net_raw
            if prev is not None:
                need[prev] |= prev_raw
        return need

    def forward(self, x: torch.Tensor, end_points: dict[str, torch.Tensor] | None = None,
                pre_logits: bool = False) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        need_raw = self._raw_needed(end_points is not None)
        act = "none" if need_raw[1] else "relu"
        outputs: list[Value | None] = [None, _as_value(self.stem(x, act), act)]
        for k, ((prev, end_point), cell) in enumerate(zip(self._steps, self.cells, strict=True)):
            relu, raw = cell(outputs[-1], None if prev is None else outputs[prev],
                             need_raw[k + 2])
            outputs.append(Value(raw, relu))
            if end_points is not None and end_point:
                end_points[end_point] = raw
        pooled = outputs[-1].relu.mean(dim=(2, 3))
        return pooled if pre_logits or self.fc is None else self.fc(pooled)


class FastMobileNetV1(nn.Module):
    """MobileNet V1's inference graph: each conv with its BN folded and relu6 fused."""

    def __init__(self, net: MobileNetV1):
        super().__init__()
        self.names = list(net.end_point_names)
        convs = []
        for name in self.names:
            block = getattr(net, name)
            if isinstance(block, ConvBNRelu6):
                convs.append(FusedConv(block, block.BatchNorm))
            elif isinstance(block, Depthwise):
                convs.append(FusedConv(block.depthwise, block.BatchNorm))
            else:
                raise TypeError(f"no fast version of MobileNet block {type(block).__name__}")
        self.convs = nn.ModuleList(convs)
        self.num_features, self.num_classes = net.num_features, net.num_classes
        head = getattr(net.Logits, "Conv2d_1c_1x1", None)
        self.fc = None if head is None else _Linear(head.weight.flatten(1), head.bias)

    def forward(self, x: torch.Tensor, end_points: dict[str, torch.Tensor] | None = None,
                pre_logits: bool = False) -> torch.Tensor:
        if min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise ValueError(f"MobileNet V1 needs images of at least {MIN_INPUT_SIZE}x"
                             f"{MIN_INPUT_SIZE} pixels, got {x.shape[-2]}x{x.shape[-1]}")
        x = x.contiguous(memory_format=torch.channels_last)
        for name, conv in zip(self.names, self.convs, strict=True):
            x = conv(x, "relu6")
            if end_points is not None:
                end_points[name] = x
        pooled = x.mean(dim=(2, 3))
        return pooled if pre_logits or self.fc is None else self.fc(pooled)


class _Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def fast_network(net: nn.Module, portable: bool = False) -> nn.Module:
    """The inference graph of a faithful network; ``net`` itself is left as it was.

    ``portable``: standard PyTorch ops only (no oneDNN private ops, no in-place tricks),
    for ``torch.compile``, which fuses the elementwise work itself.
    """
    if isinstance(net, NASNetwork):
        fast = FastNASNetwork(net)
    elif isinstance(net, MobileNetV1):
        fast = FastMobileNetV1(net)
    else:
        raise TypeError(f"no inference graph for {type(net).__name__}; expected a network from "
                        "imvec.create_model or imvec.load(...).net")
    for module in fast.modules():
        if hasattr(module, "portable"):
            module.portable = portable
    return fast.eval().requires_grad_(False)
