"""TF-compatible ops on tiny hand-checked cases (values worked out on paper)."""

import numpy as np
import pytest
import torch

from imvec.nets.ops import (
    BatchNorm,
    Conv2d,
    DropPath,
    avg_pool_same,
    factorized_reduction,
    max_pool_same,
    same_padding,
)


@pytest.mark.parametrize("size,kernel,stride,expected", [
    (224, 3, 2, (0, 1)),  # even size, stride 2: the extra pixel goes after
    (225, 3, 2, (1, 1)),
    (160, 5, 2, (1, 2)),
    (14, 7, 2, (2, 3)),
    (11, 3, 1, (1, 1)),
    (8, 1, 2, (0, 0)),
    (2, 3, 4, (0, 1)),
])
def test_same_padding(size, kernel, stride, expected):
    assert same_padding(size, kernel, stride) == expected


def ones_conv(kernel, stride, channels=1, padding="SAME"):
    conv = Conv2d(channels, 1, kernel, stride, padding=padding)
    torch.nn.init.ones_(conv.weight)
    return conv


def test_conv_same_even_stride2_pads_bottom_right():
    # 4x4 ones, 3x3 ones kernel, stride 2: TF pads 0 top / 1 bottom, so the first
    # window covers a full 3x3 block (9) and the last row/column windows see the pad.
    out = ones_conv(3, 2)(torch.ones(1, 1, 4, 4))
    assert out[0, 0].tolist() == [[9, 6], [6, 4]]


def test_conv_same_odd_size_is_symmetric():
    out = ones_conv(3, 2)(torch.ones(1, 1, 5, 5))
    assert out[0, 0].tolist() == [[4, 6, 4], [6, 9, 6], [4, 6, 4]]


def test_conv_same_non_square_kernel_and_valid():
    conv = Conv2d(1, 1, (1, 7), (1, 2))
    torch.nn.init.ones_(conv.weight)
    out = conv(torch.ones(1, 1, 3, 8))  # width 8, k 7, s 2 -> out 4, pads 2 / 3
    assert out.shape == (1, 1, 3, 4)
    assert out[0, 0, 0].tolist() == [5, 7, 6, 4]  # windows [-2,4], [0,6], [2,8], [4,10]
    assert ones_conv(3, 2, padding="VALID")(torch.ones(1, 1, 7, 7)).shape == (1, 1, 3, 3)


def test_avg_pool_excludes_padding_from_divisor():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = avg_pool_same(x, 3, 2)
    # [0,0] = mean(x[0:3, 0:3]) = 5; [0,1] = mean(x[0:3, 2:4]) = 6.5; [1,1] = mean(x[2:4, 2:4])
    assert out[0, 0].tolist() == [[5.0, 6.5], [11.0, 12.5]]
    odd = avg_pool_same(torch.arange(25.0).reshape(1, 1, 5, 5), 3, 2)
    assert odd[0, 0, 0, 0].item() == 3.0  # mean(0, 1, 5, 6): pad 1 on each side
    assert torch.all(avg_pool_same(torch.ones(1, 1, 3, 3), 3, 1) == 1)


def test_max_pool_never_picks_padding():
    x = -(torch.arange(16.0) + 1).reshape(1, 1, 4, 4)
    out = max_pool_same(x, 3, 2)
    assert out[0, 0].tolist() == [[-1.0, -3.0], [-9.0, -11.0]]
    assert out.shape == (1, 1, 2, 2)


def test_factorized_reduction_shifts_second_path():
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    identity = torch.nn.Identity()
    out = factorized_reduction(x, identity, identity, identity)
    assert out[0, 0].tolist() == [[0.0, 2.0], [6.0, 8.0]]
    assert out[0, 1].tolist() == [[4.0, 0.0], [0.0, 0.0]]  # zero pad at bottom/right


def test_batch_norm_training_uses_tf_decay_semantics():
    torch.manual_seed(0)
    bn = BatchNorm(3, eps=1e-3, decay=0.9).train()
    x = torch.randn(2, 3, 4, 5) * 3 + 1
    with torch.no_grad():
        y = bn(x)
    xs = x.double().numpy()
    mean, var = xs.mean(axis=(0, 2, 3)), xs.var(axis=(0, 2, 3))  # biased
    expected = (xs - mean[None, :, None, None]) / np.sqrt(var[None, :, None, None] + 1e-3)
    np.testing.assert_allclose(y.numpy(), expected, atol=1e-5)
    n = xs.size / 3
    np.testing.assert_allclose(bn.running_mean.numpy(), 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(bn.running_var.numpy(), 0.9 + 0.1 * var * n / (n - 1), rtol=1e-5)
    assert bn.decay == pytest.approx(0.9)
    with pytest.raises(ValueError, match="decay"):
        bn.decay = 1.5


def test_drop_path_keeps_the_expected_fraction():
    torch.manual_seed(0)
    drop = DropPath(keep_prob=0.7).train()
    out = drop(torch.ones(20000, 1, 1, 1))
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.7) < 0.02
    assert torch.allclose(out[out != 0], torch.tensor(1 / 0.7))
    assert torch.equal(drop.eval()(torch.ones(4, 2, 1, 1)), torch.ones(4, 2, 1, 1))
