"""MobileNet V1 (Howard et al., 2017) as in TF-Slim ``nets/mobilenet_v1.py``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imvec.nets.config import override
from imvec.nets.ops import BatchNorm, Conv2d

__all__ = ["CONV_DEFS", "MobileNetV1", "MobileNetV1Config", "mobilenet_v1"]

# (kind, stride, depth before the multiplier): TF-Slim MOBILENETV1_CONV_DEFS, all 3x3.
CONV_DEFS = (
    ("conv", 2, 32),
    ("sep", 1, 64), ("sep", 2, 128), ("sep", 1, 128), ("sep", 2, 256), ("sep", 1, 256),
    ("sep", 2, 512), ("sep", 1, 512), ("sep", 1, 512), ("sep", 1, 512), ("sep", 1, 512),
    ("sep", 1, 512), ("sep", 2, 1024), ("sep", 1, 1024),
)
MIN_INPUT_SIZE = 32


@dataclass(frozen=True)
class MobileNetV1Config:
    depth_multiplier: float = 1.0
    min_depth: int = 8
    dropout_keep_prob: float = 0.999


class ConvBNRelu6(Conv2d):
    """A slim conv under ``mobilenet_v1_arg_scope``: conv (no bias, 'SAME') -> ``BatchNorm``
    (a child scope, as in TF) -> relu6."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1):
        super().__init__(in_ch, out_ch, kernel, stride, groups=groups)
        self.BatchNorm = BatchNorm(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self.BatchNorm(super().forward(x)))


class Depthwise(nn.Module):
    """``Conv2d_i_depthwise``: slim.separable_conv2d with no pointwise part."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.depthwise = Conv2d(channels, channels, 3, stride, groups=channels)
        self.BatchNorm = BatchNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(self.BatchNorm(self.depthwise(x)))


class MobileNetV1(nn.Module):
    """NCHW images in [-1, 1] -> the pooled 1024*multiplier features, or logits.

    The feature vector is the global mean of ``Conv2d_13_pointwise``. TF-Slim's
    ``AvgPool_1a`` (kernel ``min(7, size)``, VALID) is the same for inputs up to 224 and
    would leave a spatial map above that; a feature vector must be global.
    """

    tf_scope = "MobilenetV1"

    def __init__(self, config: MobileNetV1Config, num_classes: int | None = None):
        super().__init__()

        def depth(d: int) -> int:
            return max(int(d * config.depth_multiplier), config.min_depth)

        in_ch = 3
        self.end_point_names = []
        for i, (kind, stride, d) in enumerate(CONV_DEFS):
            if kind == "conv":
                self.add_module(f"Conv2d_{i}", ConvBNRelu6(in_ch, depth(d), 3, stride))
                self.end_point_names.append(f"Conv2d_{i}")
            else:
                self.add_module(f"Conv2d_{i}_depthwise", Depthwise(in_ch, stride))
                self.add_module(f"Conv2d_{i}_pointwise", ConvBNRelu6(in_ch, depth(d), 1))
                self.end_point_names += [f"Conv2d_{i}_depthwise", f"Conv2d_{i}_pointwise"]
            in_ch = depth(d)
        self.num_features = in_ch
        self.num_classes = num_classes
        self.Logits = nn.Module()
        self.Logits.Dropout_1b = nn.Dropout(1.0 - config.dropout_keep_prob)
        if num_classes:
            self.Logits.Conv2d_1c_1x1 = nn.Conv2d(in_ch, num_classes, 1, bias=True)

    def forward_features(
        self, x: torch.Tensor, end_points: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        if min(x.shape[-2:]) < MIN_INPUT_SIZE:
            raise ValueError(f"MobileNet V1 needs images of at least {MIN_INPUT_SIZE}x"
                             f"{MIN_INPUT_SIZE} pixels, got {x.shape[-2]}x{x.shape[-1]}")
        for name in self.end_point_names:
            x = getattr(self, name)(x)
            if end_points is not None:
                end_points[name] = x
        return x

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        pooled = features.mean(dim=(2, 3), keepdim=True)
        if pre_logits or not self.num_classes:
            return pooled.flatten(1)
        return self.Logits.Conv2d_1c_1x1(self.Logits.Dropout_1b(pooled)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def mobilenet_v1(num_classes: int | None = None, **hparams: Any) -> MobileNetV1:
    """MobileNet V1 with TF-Slim's hyper-parameters (``depth_multiplier``, ``min_depth``)."""
    return MobileNetV1(override(MobileNetV1Config(), hparams), num_classes)
