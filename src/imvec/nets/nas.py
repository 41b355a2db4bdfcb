"""The NASNet-style network shared by NASNet-A, PNASNet-5 and AmoebaNet-A.

Stacking follows TF-Slim's ``_build_nasnet_base`` / ``_build_pnasnet_base`` and the
tensorflow/tpu ``_build_network_base``: a VALID stem conv, two stride-2 stem cells, then
``num_cells`` cells with reductions at ``calc_reduction_layers``, then relu + global mean.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from imvec.nets.cells import Cell, Genotype
from imvec.nets.ops import BatchNorm, Conv2d

__all__ = ["NASNetwork", "calc_reduction_layers"]


def calc_reduction_layers(num_cells: int, num_reduction_layers: int) -> list[int]:
    """TF's placement of reduction layers: ``int(k / (R + 1) * num_cells)`` for k = 1..R."""
    return [int(k / (num_reduction_layers + 1) * num_cells)
            for k in range(1, num_reduction_layers + 1)]


@contextmanager
def _frozen_moving_averages(module: nn.Module) -> Iterator[None]:
    """Recomputing a checkpointed cell must normalise with the same batch statistics but
    must not update BN's moving averages a second time: momentum 0 leaves them as they are."""
    norms = [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum


def _checkpointed(cell: nn.Module, net: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
    """Run ``cell`` keeping only its inputs; activations are recomputed in backward.
    The RNG state is replayed, so drop path draws the same masks."""
    return torch.utils.checkpoint.checkpoint(
        cell, net, prev, use_reentrant=False,
        context_fn=lambda: (nullcontext(), _frozen_moving_averages(cell)))


@dataclass(frozen=True)
class _Step:
    name: str  # module name, e.g. "reduction_cell_0"
    prev: int | None  # index into the list of outputs ([None, stem, cell, ...]) or None
    end_point: str | None  # TF end point recorded after this cell


class NASNetwork(nn.Module):
    """NCHW images in the network's range ([-1, 1]) -> feature vector, or logits.

    ``reduction_cell=None`` selects the PNASNet layout: the normal genotype also serves as
    stem cell and runs with stride 2 at the reduction indices, with no separate reduction
    cells. ``drop_path_schedule`` is "layer" (TF-Slim v3: keep falls linearly with the cell
    position, training-step ratio held at 1) or "constant" (AmoebaNet's v1 with no burn-in).
    """

    def __init__(
        self,
        *,
        normal_cell: Genotype,
        reduction_cell: Genotype | None,
        num_cells: int,
        num_conv_filters: int,
        stem_filters: int,
        filter_scaling_rate: float = 2.0,
        num_reduction_layers: int = 2,
        skip_reduction_layer_input: int = 0,
        drop_path_keep_prob: float = 1.0,
        drop_path_schedule: str = "layer",
        dense_dropout_keep_prob: float = 0.5,
        num_classes: int | None = None,
        bn_eps: float = 1e-3,
        stem_scope: str | None = None,
    ) -> None:
        super().__init__()
        if drop_path_schedule not in ("layer", "constant"):
            raise ValueError("drop_path_schedule must be 'layer' or 'constant', got "
                             f"{drop_path_schedule!r}")
        self.drop_path_keep_prob = drop_path_keep_prob
        self.drop_path_schedule = drop_path_schedule
        self.grad_checkpointing = False

        stem = nn.Module()
        stem.conv0 = Conv2d(3, stem_filters, 3, 2, padding="VALID")
        stem.conv0_bn = BatchNorm(stem_filters, bn_eps)
        self.stem_scope = stem_scope
        if stem_scope:
            self.add_module(stem_scope, stem)
        else:
            self.conv0, self.conv0_bn = stem.conv0, stem.conv0_bn

        channels: list[int | None] = [None, stem_filters]
        levels = [0, 0]
        steps: list[_Step] = []

        def add(name: str, genotype: Genotype, prev: int | None, scaling: float, stride: int,
                end_point: str | None) -> None:
            cell = Cell(
                genotype,
                in_channels=channels[-1],
                prev_channels=None if prev is None else channels[prev],
                prev_is_larger=prev is not None and levels[prev] < levels[-1],
                filters=int(num_conv_filters * scaling),
                stride=stride,
                eps=bn_eps,
            )
            self.add_module(name, cell)
            steps.append(_Step(name, prev, end_point))
            channels.append(cell.out_channels)
            levels.append(levels[-1] + (stride > 1))

        scaling = 1.0 / filter_scaling_rate**2
        stem_genotype = reduction_cell or normal_cell
        for i in range(2):
            prev = None if channels[-2] is None else len(channels) - 2
            add(f"cell_stem_{i}", stem_genotype, prev, scaling, 2, "Stem" if i == 1 else None)
            scaling *= filter_scaling_rate

        scaling = 1.0
        reductions = calc_reduction_layers(num_cells, num_reduction_layers)
        prev = len(channels) - 2
        for cell_num in range(num_cells):
            is_reduction = cell_num in reductions
            if skip_reduction_layer_input or not is_reduction:
                prev = len(channels) - 2
            if is_reduction:
                scaling *= filter_scaling_rate
            if is_reduction and reduction_cell is not None:
                k = reductions.index(cell_num)
                add(f"reduction_cell_{k}", reduction_cell, len(channels) - 2, scaling, 2,
                    f"Reduction_Cell_{k}")
                if not skip_reduction_layer_input:
                    prev = len(channels) - 2
            stride = 2 if is_reduction and reduction_cell is None else 1
            add(f"cell_{cell_num}", normal_cell, prev, scaling, stride, f"Cell_{cell_num}")

        self._steps = steps
        self.num_features = channels[-1]
        self.final_layer = nn.Module()
        self.final_layer.dropout = nn.Dropout(1.0 - dense_dropout_keep_prob)
        self.num_classes = num_classes
        if num_classes:
            self.final_layer.FC = nn.Linear(self.num_features, num_classes)
        self.set_drop_path_keep_prob(drop_path_keep_prob)

    def cell_keep_probs(self, keep_prob: float) -> dict[str, float]:
        """Drop-path keep probability of each cell, in build order."""
        total = len(self._steps)
        if self.drop_path_schedule == "constant":
            return {step.name: keep_prob for step in self._steps}
        return {step.name: 1.0 - (n + 1) / total * (1.0 - keep_prob)
                for n, step in enumerate(self._steps)}

    def set_drop_path_keep_prob(self, keep_prob: float) -> None:
        if not 0.0 < keep_prob <= 1.0:
            raise ValueError(f"drop_path_keep_prob must be in (0, 1], got {keep_prob}")
        self.drop_path_keep_prob = keep_prob
        for name, keep in self.cell_keep_probs(keep_prob).items():
            getattr(self, name).set_drop_path_keep_prob(keep)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Trade compute for memory when training: each cell's activations are recomputed
        during backward instead of stored (gradients and BN statistics are unchanged)."""
        self.grad_checkpointing = enable

    def forward_features(
        self, x: torch.Tensor, end_points: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The last cell's raw output (before relu); fills ``end_points`` when given."""
        stem = getattr(self, self.stem_scope) if self.stem_scope else self
        outputs: list[torch.Tensor | None] = [None, stem.conv0_bn(stem.conv0(x))]
        for step in self._steps:
            cell = getattr(self, step.name)
            prev = None if step.prev is None else outputs[step.prev]
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                out = _checkpointed(cell, outputs[-1], prev)
            else:
                out = cell(outputs[-1], prev)
            outputs.append(out)
            if end_points is not None and step.end_point:
                end_points[step.end_point] = out
        return outputs[-1]

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = F.relu(features).mean(dim=(2, 3))
        if pre_logits or not self.num_classes:
            return pooled
        return self.final_layer.FC(self.final_layer.dropout(pooled))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
