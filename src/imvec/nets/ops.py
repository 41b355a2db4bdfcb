"""TensorFlow-compatible building blocks.

Each block reproduces one TF-Slim behaviour exactly, so that a checkpoint trained in
TensorFlow gives TensorFlow's outputs here. The docstrings name the behaviour.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BatchNorm",
    "Conv2d",
    "DropPath",
    "SeparableConv2d",
    "avg_pool_same",
    "drop_path",
    "factorized_reduction",
    "max_pool_same",
    "same_padding",
]


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """Padding (before, after) of TF's 'SAME' rule along one dimension.

    TF computes out = ceil(size / stride) and pads the total shortfall, putting the odd
    pixel AFTER (bottom/right). With stride 2 on an even size that is asymmetric (k=3:
    0/1, k=5: 1/2), which PyTorch's symmetric ``padding=k//2`` cannot express.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class Conv2d(nn.Conv2d):
    """Convolution with TF padding, 'SAME' (at any input size) or 'VALID'.

    No bias by default: every slim conv here is followed by batch norm.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        *,
        groups: int = 1,
        bias: bool = False,
        padding: str = "SAME",
    ) -> None:
        if padding not in ("SAME", "VALID"):
            raise ValueError(f"padding must be 'SAME' or 'VALID', got {padding!r}")
        super().__init__(in_channels, out_channels, kernel_size, stride, groups=groups, bias=bias)
        self.tf_padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tf_padding == "VALID":
            return self._conv_forward(x, self.weight, self.bias)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        top, bottom = same_padding(x.shape[-2], kh, sh)
        left, right = same_padding(x.shape[-1], kw, sw)
        if top == bottom and left == right:
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), 1, self.groups)
        x = F.pad(x, (left, right, top, bottom))
        return self._conv_forward(x, self.weight, self.bias)


class SeparableConv2d(nn.Module):
    """slim.separable_conv2d: depthwise KxK (multiplier 1, strided) then pointwise 1x1.

    Child names ``depthwise``/``pointwise`` map to TF's ``depthwise_weights`` and
    ``pointwise_weights``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        super().__init__()
        self.depthwise = Conv2d(in_channels, in_channels, kernel_size, stride, groups=in_channels)
        self.pointwise = Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class BatchNorm(nn.BatchNorm2d):
    """slim.batch_norm (center, scale, fused) with TF's decay semantics.

    Training mode normalises with the batch mean and the biased batch variance and updates
    ``moving = decay * moving + (1 - decay) * batch`` with the unbiased variance and no
    zero-debiasing; that is exactly PyTorch's rule with ``momentum = 1 - decay``.
    The epsilon is not stored in checkpoints: 1e-3 for TF-Slim nets, 1e-5 for AmoebaNet.
    """

    def __init__(self, num_features: int, eps: float = 1e-3, decay: float = 0.99) -> None:
        super().__init__(num_features, eps=eps, momentum=1.0 - decay)

    @property
    def decay(self) -> float:
        return 1.0 - self.momentum

    @decay.setter
    def decay(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"batch norm decay (TF's momentum) must be in [0, 1], got {value}")
        self.momentum = 1.0 - value


def _pool_same(pool, x: torch.Tensor, kernel: int, stride: int, **kwargs) -> torch.Tensor:
    """Pool with TF 'SAME' padding where padded cells never contribute.

    TF's extra pad pixel, when any, goes bottom/right; ``ceil_mode`` produces exactly that
    trailing partial window while PyTorch leaves out-of-range cells out of both the max and
    the average's divisor.
    """
    top, _ = same_padding(x.shape[-2], kernel, stride)
    left, _ = same_padding(x.shape[-1], kernel, stride)
    return pool(x, kernel, stride, padding=(top, left), ceil_mode=True, **kwargs)


def avg_pool_same(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """tf.nn.avg_pool 'SAME': the divisor counts only real (non-padding) cells."""
    return _pool_same(F.avg_pool2d, x, kernel, stride, count_include_pad=False)


def max_pool_same(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    """tf.nn.max_pool 'SAME': padding acts as -inf, so it never wins."""
    return _pool_same(F.max_pool2d, x, kernel, stride)


def drop_path(x: torch.Tensor, keep_prob: float) -> torch.Tensor:
    """TF-Slim drop_path: per example, ``x / keep * floor(keep + U[0, 1))``."""
    if keep_prob >= 1.0:
        return x
    noise = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
    return x * (1.0 / keep_prob) * torch.floor(keep_prob + noise)


class DropPath(nn.Module):
    """Drop path that is active only in training mode."""

    def __init__(self, keep_prob: float = 1.0) -> None:
        super().__init__()
        self.keep_prob = keep_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.keep_prob) if self.training else x

    def extra_repr(self) -> str:
        return f"keep_prob={self.keep_prob:.4f}"


def factorized_reduction(
    x: torch.Tensor, path1_conv: nn.Module, path2_conv: nn.Module, bn: nn.Module
) -> torch.Tensor:
    """TF-Slim factorized_reduction with stride 2 (input already activated by the caller).

    Path 1 samples every second pixel from (0, 0); path 2 first shifts the map by one pixel
    (pad a zero row/column bottom/right, drop the first row/column), so the two halves see
    interleaved pixels. For an odd size both give ceil(n/2) pixels.
    """
    path1 = path1_conv(x[:, :, ::2, ::2])
    shifted = F.pad(x, (0, 1, 0, 1))[:, :, 1:, 1:]
    path2 = path2_conv(shifted[:, :, ::2, ::2])
    return bn(torch.cat([path1, path2], dim=1))
