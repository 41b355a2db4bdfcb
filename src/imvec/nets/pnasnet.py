"""PNASNet-5 (Liu et al., 2018) as in TF-Slim ``nets/nasnet/pnasnet.py``.

One cell type serves everywhere: as the two stride-2 stem cells, as the normal cell, and
with stride 2 at the reduction indices (there are no separate reduction cells).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imvec.nets.cells import Genotype
from imvec.nets.config import override
from imvec.nets.nas import NASNetwork

__all__ = ["PNASNET_5", "PNASNetConfig", "pnasnet_large"]

PNASNET_5 = Genotype(
    "pnasnet_5",
    combs=(
        ("separable_5x5_2", 1, "max_pool_3x3", 1),
        ("separable_7x7_2", 0, "max_pool_3x3", 0),
        ("separable_5x5_2", 0, "separable_3x3_2", 0),
        ("separable_3x3_2", 4, "max_pool_3x3", 0),
        ("separable_3x3_2", 1, "none", 0),
    ),
    concat=(2, 3, 4, 5, 6),
)


@dataclass(frozen=True)
class PNASNetConfig:
    """TF-Slim pnasnet ``large_imagenet_config()`` fields that shape the network."""

    num_cells: int = 12
    num_conv_filters: int = 216
    stem_multiplier: float = 3.0
    skip_reduction_layer_input: int = 1
    drop_path_keep_prob: float = 0.6
    dense_dropout_keep_prob: float = 0.5
    filter_scaling_rate: float = 2.0
    num_reduction_layers: int = 2


def pnasnet_large(num_classes: int | None = None, **hparams: Any) -> NASNetwork:
    """PNASNet-5 large: 12 cells, 216 filters, 331x331, 4320 features."""
    config = override(PNASNetConfig(), hparams)
    return NASNetwork(
        normal_cell=PNASNET_5,
        reduction_cell=None,
        stem_filters=int(32 * config.stem_multiplier),
        num_classes=num_classes,
        **{k: v for k, v in vars(config).items() if k != "stem_multiplier"},
    )
