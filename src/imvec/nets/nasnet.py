"""NASNet-A (Zoph et al., 2018), mobile and large, as in TF-Slim ``nets/nasnet/nasnet.py``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from imvec.nets.cells import Genotype
from imvec.nets.config import override
from imvec.nets.nas import NASNetwork

__all__ = ["NASNET_A_NORMAL", "NASNET_A_REDUCTION", "NASNetConfig", "nasnet_large", "nasnet_mobile"]

NASNET_A_NORMAL = Genotype(
    "nasnet_a_normal",
    combs=(
        ("separable_5x5_2", 0, "separable_3x3_2", 1),
        ("separable_5x5_2", 1, "separable_3x3_2", 1),
        ("avg_pool_3x3", 0, "none", 1),
        ("avg_pool_3x3", 1, "avg_pool_3x3", 1),
        ("separable_3x3_2", 0, "none", 0),
    ),
    concat=(1, 2, 3, 4, 5, 6),
)

NASNET_A_REDUCTION = Genotype(
    "nasnet_a_reduction",
    combs=(
        ("separable_5x5_2", 0, "separable_7x7_2", 1),
        ("max_pool_3x3", 0, "separable_7x7_2", 1),
        ("avg_pool_3x3", 0, "separable_5x5_2", 1),
        ("none", 3, "avg_pool_3x3", 2),
        ("separable_3x3_2", 2, "max_pool_3x3", 0),
    ),
    concat=(3, 4, 5, 6),
)


@dataclass(frozen=True)
class NASNetConfig:
    """TF-Slim ``mobile_imagenet_config()`` / ``large_imagenet_config()`` fields that shape
    the network (training-schedule fields such as ``total_training_steps`` do not)."""

    num_cells: int
    num_conv_filters: int
    stem_multiplier: float
    skip_reduction_layer_input: int
    drop_path_keep_prob: float
    dense_dropout_keep_prob: float = 0.5
    filter_scaling_rate: float = 2.0
    num_reduction_layers: int = 2


MOBILE = NASNetConfig(num_cells=12, num_conv_filters=44, stem_multiplier=1.0,
                      skip_reduction_layer_input=0, drop_path_keep_prob=1.0)
LARGE = NASNetConfig(num_cells=18, num_conv_filters=168, stem_multiplier=3.0,
                     skip_reduction_layer_input=1, drop_path_keep_prob=0.7)


def _build(config: NASNetConfig, num_classes: int | None) -> NASNetwork:
    return NASNetwork(
        normal_cell=NASNET_A_NORMAL,
        reduction_cell=NASNET_A_REDUCTION,
        stem_filters=int(32 * config.stem_multiplier),
        num_classes=num_classes,
        **{k: v for k, v in vars(config).items() if k != "stem_multiplier"},
    )


def nasnet_mobile(num_classes: int | None = None, **hparams: Any) -> NASNetwork:
    """NASNet-A mobile: 12 cells, 44 filters, 224x224, 1056 features."""
    return _build(override(MOBILE, hparams), num_classes)


def nasnet_large(num_classes: int | None = None, **hparams: Any) -> NASNetwork:
    """NASNet-A large: 18 cells, 168 filters, stem multiplier 3, 331x331, 4032 features."""
    return _build(override(LARGE, hparams), num_classes)
