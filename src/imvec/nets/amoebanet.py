"""AmoebaNet-A (Real et al., 2019) as in tensorflow/tpu ``models/official/amoeba_net``.

The TPU code forks TF-Slim's NASNet cell engine; what differs is data: the genotypes, the
``1x7_7x1`` bottleneck op, a stem under the ``stem`` scope, BN epsilon 1e-5 (the TF-Hub
export's flag value) and a constant drop-path keep probability.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imvec.nets.cells import Genotype
from imvec.nets.config import override
from imvec.nets.nas import NASNetwork

__all__ = ["AMOEBANET_A_NORMAL", "AMOEBANET_A_REDUCTION", "AmoebaNetConfig", "amoebanet_a"]

AMOEBANET_A_NORMAL = Genotype(
    "amoebanet_a_normal",
    combs=(
        ("avg_pool_3x3", 0, "max_pool_3x3", 0),
        ("separable_3x3_2", 1, "none", 1),
        ("none", 0, "avg_pool_3x3", 1),
        ("separable_3x3_2", 0, "separable_5x5_2", 2),
        ("avg_pool_3x3", 5, "separable_3x3_2", 0),
    ),
    concat=(1, 3, 4, 6),
)

AMOEBANET_A_REDUCTION = Genotype(
    "amoebanet_a_reduction",
    combs=(
        ("separable_3x3_2", 1, "avg_pool_3x3", 0),
        ("max_pool_3x3", 0, "separable_7x7_2", 2),
        ("max_pool_3x3", 1, "max_pool_3x3", 0),
        ("separable_3x3_2", 4, "1x7_7x1", 0),
        ("avg_pool_3x3", 1, "separable_7x7_2", 0),
    ),
    concat=(2, 3, 4, 5, 6),
)


@dataclass(frozen=True)
class AmoebaNetConfig:
    """tensorflow/tpu AmoebaNet hparams as the TF-Hub export set them."""

    num_cells: int = 18
    reduction_size: int = 448
    stem_reduction_size: int = 32
    drop_connect_keep_prob: float = 0.7
    dense_dropout_keep_prob: float = 0.5
    batch_norm_epsilon: float = 1e-5
    num_reduction_layers: int = 2


def amoebanet_a(num_classes: int | None = None, **hparams: Any) -> NASNetwork:
    """AmoebaNet-A, N=18 (6 per stack), F=448: 331x331, 7168 features."""
    config = override(AmoebaNetConfig(), hparams)
    return NASNetwork(
        normal_cell=AMOEBANET_A_NORMAL,
        reduction_cell=AMOEBANET_A_REDUCTION,
        num_cells=config.num_cells,
        num_conv_filters=config.reduction_size,
        stem_filters=config.stem_reduction_size,
        num_reduction_layers=config.num_reduction_layers,
        skip_reduction_layer_input=0,
        drop_path_keep_prob=config.drop_connect_keep_prob,
        drop_path_schedule="constant",
        dense_dropout_keep_prob=config.dense_dropout_keep_prob,
        num_classes=num_classes,
        bn_eps=config.batch_norm_epsilon,
        stem_scope="stem",
    )
