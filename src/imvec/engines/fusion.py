"""Inference-only building blocks: batch norm folded into the convolution before it, and
the activation (and a residual add) fused into the convolution's output.

At inference a BN is an affine map per channel, so ``bn(conv(x)) = conv'(x)`` with
``W' = W * s`` and ``b' = shift + b * s``: one pass over the data instead of two. On CPU,
oneDNN (PyTorch's ``mkldnn`` backend) can also apply ``relu``/``relu6`` and an elementwise
add while the output is still in cache; where that backend is missing (or gradients must
flow to the input) the same arithmetic runs through ``F.conv2d``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from imvec.nets.ops import Conv2d, same_padding

__all__ = [
    "ACTIVATIONS",
    "FusedConv",
    "fold_batch_norm",
    "fused_conv2d",
    "is_portable",
    "mkldnn_fusion_available",
    "portable_ops",
    "portable_same_pads",
]

# activation name -> (oneDNN post-op, its scalars)
ACTIVATIONS: dict[str, tuple[str, list[float]]] = {
    "none": ("none", []),
    "relu": ("relu", []),
    "relu6": ("hardtanh", [0.0, 6.0]),
}


def fold_batch_norm(
    weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d,
    channels: slice = slice(None),
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', b')`` with ``conv(x, W', b') == bn(conv(x, W, b))`` in inference mode.

    ``channels`` selects the BN channels that this convolution produces: TF's factorized
    reduction concatenates two convolutions before one BN, so each half folds its slice.
    The per-channel scale and shift are computed in float64; the weights are scaled in
    their own dtype (one rounding, within an ulp; AmoebaNet has 468M of them).
    """
    var = bn.running_var.double()[channels]
    scale = bn.weight.double()[channels] / torch.sqrt(var + bn.eps)
    shift = bn.bias.double()[channels] - bn.running_mean.double()[channels] * scale
    if bias is not None:
        shift = shift + bias.double() * scale
    folded = weight * scale.to(weight.dtype).view(-1, *([1] * (weight.dim() - 1)))
    return folded, shift.to(weight.dtype)


def mkldnn_fusion_available() -> bool:
    """oneDNN's fused convolution op is compiled into this PyTorch (x86 and arm64 wheels)."""
    return torch.backends.mkldnn.is_available() and hasattr(
        torch.ops.mkldnn, "_convolution_pointwise")


_MKLDNN = mkldnn_fusion_available()
_PORTABLE = [False]


@contextmanager
def portable_ops() -> Iterator[None]:
    """Standard ops only, and padding written as arithmetic on the input size: for
    tracing and export (ONNX, TorchScript), where oneDNN's private ops and a branch on
    the size's parity would not survive."""
    saved, _PORTABLE[0] = _PORTABLE[0], True
    try:
        yield
    finally:
        _PORTABLE[0] = saved


def is_portable() -> bool:
    """Inside :func:`portable_ops`."""
    return _PORTABLE[0]


def _use_mkldnn(x: torch.Tensor, add: torch.Tensor | None) -> bool:
    if not _MKLDNN or x.device.type != "cpu":
        return False
    if x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or (add is not None and add.requires_grad)):
        return False  # the fused op has no backward; F.conv2d does
    return add is None or (add.dtype == x.dtype and add.is_contiguous(
        memory_format=torch.channels_last))


def fused_conv2d(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
    stride: tuple[int, int], padding: tuple[int, int], groups: int = 1,
    activation: str = "none", add: torch.Tensor | None = None, portable: bool = False,
) -> torch.Tensor:
    """``activation(conv2d(x) + add)`` in one oneDNN primitive where available
    (``portable``: standard ops only)."""
    if not portable and _use_mkldnn(x, add):
        attr, scalars = ACTIVATIONS[activation]
        if add is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x, weight, bias, padding, stride, (1, 1), groups, attr, scalars, "")
        return torch.ops.mkldnn._convolution_pointwise.binary(
            x, add, weight, bias, padding, stride, (1, 1), groups, "add", None,
            None if attr == "none" else attr, scalars, "")
    y = F.conv2d(x, weight, bias, stride, padding, 1, groups)
    if add is not None:
        y = y + add
    if activation == "relu":
        y = F.relu(y)
    elif activation == "relu6":
        y = F.relu6(y)
    return y


# Below this many FLOPs a 1x1 convolution runs as one BLAS matmul on the NHWC view:
# oneDNN's fixed cost per call (~30 us) would exceed the work (batch-1 NASNet-mobile).
SMALL_GEMM_FLOPS = 8e6


class _Plan(NamedTuple):
    pads: tuple[int, int, int, int] | None  # F.pad before the conv (dense convs only)
    padding: tuple[int, int]  # symmetric padding of the conv itself
    stride: tuple[int, int]
    shift: tuple[bool, bool]  # use the kernel with a zero first row / column
    matmul: bool  # a small 1x1 conv: one BLAS matmul


class FusedConv(nn.Module):
    """A TF-padded convolution with its BN folded in; activation and add chosen per call.

    Weights are buffers, not parameters: this is an inference graph, derived from the
    faithful one, and nothing should train it by mistake. On first use oneDNN reorders
    the weights into its blocked layout once (``_packed``, never saved or copied) instead
    of on every call.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None,
                 channels: slice = slice(None)) -> None:
        super().__init__()
        weight, bias = conv.weight.detach(), conv.bias
        bias = None if bias is None else bias.detach()
        if bn is not None:
            weight, bias = fold_batch_norm(weight, bias, bn, channels)
        self.register_buffer("weight", weight.contiguous(memory_format=torch.channels_last))
        self.register_buffer("bias", None if bias is None else bias.contiguous())
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.groups = conv.groups
        self.tf_padding = getattr(conv, "tf_padding", "VALID")
        if not isinstance(conv, Conv2d) and tuple(conv.padding) != (0, 0):
            raise ValueError("FusedConv takes TF-padded convolutions (imvec.nets.ops.Conv2d) or "
                             f"unpadded ones; got padding {conv.padding}")
        self._packed: dict[tuple, torch.Tensor] = {}
        self._plans: dict[tuple, _Plan] = {}
        self.portable = False  # standard ops only (see portable_ops), e.g. for torch.compile

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_packed"] = {}  # oneDNN's opaque tensors can't be copied; repacked on use
        state["_plans"] = {}
        return state

    def _apply(self, fn, recurse=True):  # .to()/.half() make the packed weights stale
        self._packed, self._plans = {}, {}
        return super()._apply(fn, recurse)

    def _kernel(self, shift: tuple[bool, bool]) -> torch.Tensor:
        """The weights, with a zero first row / column where ``shift`` says (see forward)."""
        if shift == (False, False):
            return self.weight
        key = ("shifted", shift)
        if key not in self._packed:
            pads = (int(shift[1]), 0, int(shift[0]), 0)
            self._packed[key] = F.pad(self.weight, pads).contiguous(
                memory_format=torch.channels_last)
        return self._packed[key]

    def _weight_for(self, x: torch.Tensor, padding: tuple[int, int], stride: tuple[int, int],
                    shift: tuple[bool, bool] = (False, False)) -> torch.Tensor:
        weight = self._kernel(shift)
        if not _MKLDNN or x.dtype != self.weight.dtype or x.device.type != "cpu":
            return weight
        key = (padding, stride, shift)
        packed = self._packed.get(key)
        if packed is None:
            packed = torch.ops.mkldnn._reorder_convolution_weight(
                weight, list(padding), list(stride), [1, 1], self.groups, list(x.shape))
            self._packed[key] = packed
        return packed

    def _plan(self, shape: torch.Size, stride: tuple[int, int],
              padding: tuple[int, int] | None) -> _Plan:
        """How to run this convolution on inputs of ``shape`` (cached per shape)."""
        pads, shift = None, (False, False)
        if padding is None:
            padding = (0, 0)
            if self.tf_padding == "SAME":
                (kh, kw), (sh, sw) = self.kernel_size, stride
                top, bottom = same_padding(shape[-2], kh, sh)
                left, right = same_padding(shape[-1], kw, sw)
                if top == bottom and left == right:
                    padding = (top, left)
                elif self.groups > 1:
                    # TF puts the odd pixel bottom/right; oneDNN pads symmetrically. A kernel
                    # with a zero first row (column) and one more pixel of padding on both
                    # sides reads the same pixels with no padded copy of x (which costs a
                    # depthwise conv more than the extra multiplies do).
                    shift, padding = (top != bottom, left != right), (bottom, right)
                else:
                    pads = (left, right, top, bottom)
        n, c, h, w = shape
        matmul = (self.kernel_size == (1, 1) and stride == (1, 1) and self.groups == 1
                  and padding == (0, 0)
                  and 2.0 * n * h * w * c * self.weight.shape[0] < SMALL_GEMM_FLOPS)
        return _Plan(pads, padding, stride, shift, matmul)

    def forward(self, x: torch.Tensor, activation: str = "none",
                add: torch.Tensor | None = None, *, stride: tuple[int, int] | None = None,
                padding: tuple[int, int] | None = None) -> torch.Tensor:
        """``stride``/``padding`` override the TF rule (explicit, symmetric padding)."""
        stride = stride or self.stride
        if self.portable or _PORTABLE[0]:
            if padding is None:
                x, padding = _portable_same_padding(x, self.kernel_size, stride,
                                                    self.tf_padding)
            return fused_conv2d(x, self.weight, self.bias, stride, padding, self.groups,
                                activation, add, portable=True)
        key = (x.shape, stride, padding)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan(x.shape, stride, padding)
        if plan.pads is not None:
            x = F.pad(x, plan.pads)
        if plan.matmul:
            return _matmul_1x1(x, self.weight, self.bias, activation, add)
        weight = (self._weight_for(x, plan.padding, stride, plan.shift) if _use_mkldnn(x, add)
                  else self._kernel(plan.shift))
        return fused_conv2d(x, weight, self.bias, stride, plan.padding, self.groups,
                            activation, add)

    def extra_repr(self) -> str:
        out, cin = self.weight.shape[:2]
        return (f"{cin * self.groups}, {out}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, groups={self.groups}, padding={self.tf_padding}")


def portable_same_pads(size: int, kernel: int, stride: int) -> list[int]:
    """TF 'SAME' padding [before, after] of a strided kernel (k >= 3 > s, as all of them
    here: the total is never negative) as arithmetic on a size that may be symbolic."""
    total = ((size + stride - 1) // stride - 1) * stride + kernel - size
    return [total // 2, total - total // 2]


def _portable_same_padding(
    x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], mode: str,
) -> tuple[torch.Tensor, tuple[int, int]]:
    """TF 'SAME' without branching on the size: stride 1 pads (k-1)/2 each side; a
    strided kernel pads ``(ceil(n/s) - 1) * s + k - n`` in total, the odd pixel after."""
    if mode != "SAME":
        return x, (0, 0)
    pads, symmetric, padded = [], [], False
    for dim, k, s in ((-1, kernel[1], stride[1]), (-2, kernel[0], stride[0])):
        if k == 1 or s == 1:  # k=1: never any padding; all kernels here are odd
            pads += [0, 0]
            symmetric.append((k - 1) // 2)
        else:
            pads += portable_same_pads(x.shape[dim], k, s)
            symmetric.append(0)
            padded = True
    if padded:
        x = F.pad(x, pads)
    return x, (symmetric[1], symmetric[0])


def _matmul_1x1(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                activation: str, add: torch.Tensor | None) -> torch.Tensor:
    """A 1x1 convolution as ``[N*H*W, C] @ [C, K]`` on the channels_last view; the small
    output stays in cache for the add and activation that follow."""
    n, c, h, w = x.shape
    rows = x.permute(0, 2, 3, 1).reshape(-1, c)
    matrix = weight.reshape(weight.shape[0], c).t()
    y = rows @ matrix if bias is None else torch.addmm(bias, rows, matrix)
    if add is not None:
        y += add.permute(0, 2, 3, 1).reshape(y.shape)
    if activation == "relu":
        y.clamp_(min=0)
    elif activation == "relu6":
        y.clamp_(0, 6)
    return y.view(n, h, w, -1).permute(0, 3, 1, 2)
