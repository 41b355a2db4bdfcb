"""One NAS cell machine for NASNet-A, PNASNet-5 and AmoebaNet-A.

A cell is a genotype table: five combinations, each adding ``left_op(h[left])`` and
``right_op(h[right])`` into a new hidden state, plus the list of states concatenated as
the output. h0 is the cell's main input after relu -> 1x1 conv -> BN, h1 the previous
layer adjusted to the same size. Module names mirror TF-Slim's variable scopes
(``comb_iter_2/left/separable_5x5_1/depthwise``), so checkpoints map by one generic rule.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from imvec.nets.ops import (
    BatchNorm,
    Conv2d,
    SeparableConv2d,
    avg_pool_same,
    drop_path,
    factorized_reduction,
    max_pool_same,
)

__all__ = ["Cell", "Genotype", "build_op"]


@dataclass(frozen=True)
class Genotype:
    """A cell's wiring: ``combs`` rows are (left op, left input, right op, right input)."""

    name: str
    combs: tuple[tuple[str, int, str, int], ...]
    concat: tuple[int, ...]

    def __post_init__(self) -> None:
        for i, (left_op, left, right_op, right) in enumerate(self.combs):
            for op, index in ((left_op, left), (right_op, right)):
                if not 0 <= index < 2 + i:
                    raise ValueError(
                        f"genotype {self.name!r}: comb_iter_{i} reads h{index}, but only "
                        f"h0..h{1 + i} exist at that point"
                    )
                _parse_op(op, self.name)
        num_states = 2 + len(self.combs)
        if not self.concat or any(not 0 <= s < num_states for s in self.concat):
            raise ValueError(
                f"genotype {self.name!r}: concat {self.concat} must name states "
                f"h0..h{num_states - 1}")


class SeparableStack(nn.Sequential):
    """'separable_KxK_N': N x (relu -> separable conv -> BN); only the first one strides."""

    def __init__(self, kernel: int, repeats: int, in_ch: int, filters: int, stride: int,
                 eps: float):
        super().__init__()
        for n in range(1, repeats + 1):
            self.add_module(f"relu_{n}", nn.ReLU())
            self.add_module(f"separable_{kernel}x{kernel}_{n}",
                            SeparableConv2d(in_ch, filters, kernel, stride))
            self.add_module(f"bn_sep_{kernel}x{kernel}_{n}", BatchNorm(filters, eps))
            in_ch, stride = filters, 1


class Pool(nn.Module):
    """'avg_pool_3x3' / 'max_pool_3x3' (TF 'SAME'); a 1x1 conv + BN, no relu, when
    the input has other than ``filters`` channels."""

    def __init__(self, kind: str, kernel: int, in_ch: int, filters: int, stride: int, eps: float):
        super().__init__()
        self.pool = avg_pool_same if kind == "avg" else max_pool_same
        self.kernel, self.stride = kernel, stride
        self.project = in_ch != filters
        if self.project:
            self.add_module("1x1", Conv2d(in_ch, filters, 1))
            self.bn_1 = BatchNorm(filters, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(x, self.kernel, self.stride)
        return self.bn_1(getattr(self, "1x1")(x)) if self.project else x


class Identity(nn.Module):
    """'none': the identity, unless a stride or a channel change forces
    relu -> strided 1x1 conv -> BN."""

    def __init__(self, in_ch: int, filters: int, stride: int, eps: float):
        super().__init__()
        self.project = stride > 1 or in_ch != filters
        if self.project:
            self.add_module("1x1", Conv2d(in_ch, filters, 1, stride))
            self.bn_1 = BatchNorm(filters, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn_1(getattr(self, "1x1")(F.relu(x))) if self.project else x


class Bottleneck1x7(nn.Sequential):
    """AmoebaNet '1x7_7x1': relu -> 1x1 (F/4) -> BN -> relu -> 1x7 (stride [1, s]) -> BN
    -> relu -> 7x1 (stride [s, 1]) -> BN -> relu -> 1x1 (F) -> BN."""

    def __init__(self, in_ch: int, filters: int, stride: int, eps: float):
        super().__init__()
        width = filters // 4
        layers = [
            ("pre_1x1", Conv2d(in_ch, width, 1)), ("pre_bn", BatchNorm(width, eps)),
            ("1x7", Conv2d(width, width, (1, 7), (1, stride))),
            ("bn_1x7_7x1", BatchNorm(width, eps)),
            ("7x1", Conv2d(width, width, (7, 1), (stride, 1))), ("bn", BatchNorm(width, eps)),
            ("post_1x1", Conv2d(width, filters, 1)), ("post_bn", BatchNorm(filters, eps)),
        ]
        for i, (name, layer) in enumerate(layers):
            if i % 2 == 0:
                self.add_module(f"relu_{name}", nn.ReLU())
            self.add_module(name, layer)


OpFactory = Callable[[int, int, int, float], nn.Module]  # (in_ch, filters, stride, eps)

_OPS: list[tuple[str, Callable[..., OpFactory]]] = [
    (r"separable_(\d+)x\1_(\d+)",
     lambda k, n: lambda i, f, s, e: SeparableStack(int(k), int(n), i, f, s, e)),
    (r"(avg|max)_pool_(\d+)x\2",
     lambda kind, k: lambda i, f, s, e: Pool(kind, int(k), i, f, s, e)),
    (r"none", lambda: Identity),
    (r"1x7_7x1", lambda: Bottleneck1x7),
]


def _parse_op(op: str, cell: str) -> OpFactory:
    for pattern, make in _OPS:
        match = re.fullmatch(pattern, op)
        if match:
            return make(*match.groups())
    known = "separable_KxK_N, avg_pool_KxK, max_pool_KxK, none, 1x7_7x1"
    raise ValueError(f"genotype {cell!r}: unknown operation {op!r} (known: {known})")


def build_op(op: str, in_ch: int, filters: int, stride: int, eps: float = 1e-3) -> nn.Module:
    """Instantiate one operation string, e.g. ``build_op('separable_5x5_2', 32, 44, 2)``."""
    return _parse_op(op, "<op>")(in_ch, filters, stride, eps)


class Comb(nn.Module):
    """``comb_iter_i``: left op + right op, with drop path on every op but 'none'."""

    def __init__(self, left: nn.Module, right: nn.Module, drops: tuple[bool, bool]):
        super().__init__()
        self.left, self.right, self.drops = left, right, drops
        self.drop_path_keep_prob = 1.0

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = self.left(a), self.right(b)
        if self.training and self.drop_path_keep_prob < 1.0:
            a = drop_path(a, self.drop_path_keep_prob) if self.drops[0] else a
            b = drop_path(b, self.drop_path_keep_prob) if self.drops[1] else b
        return a + b


class FactorizedReduction(nn.Module):
    """Matches an unused hidden state to the cell output's size (``cell_output/reduction_i``)."""

    def __init__(self, in_ch: int, filters: int, stride: int, eps: float):
        super().__init__()
        self.stride = stride
        if stride == 1:
            self.path_conv, self.path_bn = Conv2d(in_ch, filters, 1), BatchNorm(filters, eps)
        else:
            self.path1_conv = Conv2d(in_ch, filters // 2, 1)
            self.path2_conv = Conv2d(in_ch, filters // 2, 1)
            self.final_path_bn = BatchNorm(filters, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            return self.path_bn(self.path_conv(x))
        return factorized_reduction(x, self.path1_conv, self.path2_conv, self.final_path_bn)


class Cell(nn.Module):
    """A NAS cell (TF-Slim ``NasNetABaseCell`` semantics) driven by a :class:`Genotype`.

    Args:
        in_channels: channels of the main input ``net``.
        prev_channels: channels of the previous layer, or None for the first stem cell,
            whose h1 is then ``net`` itself, untouched.
        prev_is_larger: the previous layer has twice this cell's input resolution; it is
            then relu'd and factorized-reduced (``path1_conv``, ``path2_conv``,
            ``final_path_bn``).
        filters: F, ``int(num_conv_filters * filter_scaling)``.
        stride: applies only to ops that read h0 or h1.
    """

    def __init__(
        self,
        genotype: Genotype,
        *,
        in_channels: int,
        prev_channels: int | None,
        prev_is_larger: bool,
        filters: int,
        stride: int,
        eps: float = 1e-3,
    ) -> None:
        super().__init__()
        self.genotype, self.filters, self.stride = genotype, filters, stride
        self.add_module("1x1", Conv2d(in_channels, filters, 1))
        self.beginning_bn = BatchNorm(filters, eps)
        self.prev_mode = self._add_prev_adjustment(prev_channels, prev_is_larger, filters, eps)

        channels = [filters, in_channels if prev_channels is None else filters]
        reduced = [False, False]
        for i, (left_op, left, right_op, right) in enumerate(genotype.combs):
            # Ops on h0/h1 take the stride and later states are already reduced, so both
            # sides of a combination always agree in size.
            ops = [build_op(op, channels[index], filters, stride if index < 2 else 1, eps)
                   for op, index in ((left_op, left), (right_op, right))]
            drops = (left_op != "none", right_op != "none")
            self.add_module(f"comb_iter_{i}", Comb(*ops, drops))
            channels.append(filters)
            reduced.append(stride > 1)

        self.cell_output = nn.ModuleDict()
        for index in genotype.concat:
            other_size = reduced[index] != reduced[-1]
            if other_size or channels[index] != filters:
                self.cell_output[f"reduction_{index}"] = FactorizedReduction(
                    channels[index], filters, 2 if other_size else 1, eps)
        self.out_channels = sum(
            filters if f"reduction_{i}" in self.cell_output else channels[i]
            for i in genotype.concat
        )

    def _add_prev_adjustment(self, prev_ch: int | None, larger: bool, filters: int,
                             eps: float) -> str:
        """TF ``_reduce_prev_layer``: how h1 is made from the previous layer."""
        if prev_ch is None:
            return "none"
        if larger:
            self.path1_conv = Conv2d(prev_ch, filters // 2, 1)
            self.path2_conv = Conv2d(prev_ch, filters // 2, 1)
            self.final_path_bn = BatchNorm(filters, eps)
            return "factorized"
        if prev_ch != filters:
            self.prev_1x1, self.prev_bn = Conv2d(prev_ch, filters, 1), BatchNorm(filters, eps)
            return "project"
        return "identity"

    def set_drop_path_keep_prob(self, keep_prob: float) -> None:
        for module in self.children():
            if isinstance(module, Comb):
                module.drop_path_keep_prob = keep_prob

    def forward(self, net: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        if self.prev_mode == "none":
            h1 = net
        elif self.prev_mode == "factorized":
            h1 = factorized_reduction(F.relu(prev), self.path1_conv, self.path2_conv,
                                      self.final_path_bn)
        elif self.prev_mode == "project":
            h1 = self.prev_bn(self.prev_1x1(F.relu(prev)))
        else:
            h1 = prev
        states = [self.beginning_bn(getattr(self, "1x1")(F.relu(net))), h1]
        for i, (_, left, _, right) in enumerate(self.genotype.combs):
            states.append(getattr(self, f"comb_iter_{i}")(states[left], states[right]))
        outputs = []
        for index in self.genotype.concat:
            state, key = states[index], f"reduction_{index}"
            if key in self.cell_output:
                state = self.cell_output[key](state)
            outputs.append(state)
        return torch.cat(outputs, dim=1)
