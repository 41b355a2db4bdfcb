"""The genotype-driven cell: table validation, op registry, wiring rules."""

import pytest
import torch

from imvec.nets.amoebanet import AMOEBANET_A_NORMAL, AMOEBANET_A_REDUCTION
from imvec.nets.cells import Cell, Genotype, build_op
from imvec.nets.nasnet import NASNET_A_NORMAL, NASNET_A_REDUCTION
from imvec.nets.pnasnet import PNASNET_5


def test_genotype_rejects_reading_a_future_state():
    with pytest.raises(ValueError, match="'broken': comb_iter_0 reads h2"):
        Genotype("broken", combs=(("none", 2, "none", 0),), concat=(2,))


def test_genotype_rejects_unknown_op_and_bad_concat():
    with pytest.raises(ValueError, match="unknown operation 'conv_9x9'"):
        Genotype("bad_op", combs=(("conv_9x9", 0, "none", 1),), concat=(2,))
    with pytest.raises(ValueError, match="concat"):
        Genotype("bad_concat", combs=(("none", 0, "none", 1),), concat=(5,))


@pytest.mark.parametrize("op,names", [
    ("separable_5x5_2", ["separable_5x5_1", "bn_sep_5x5_1", "separable_5x5_2", "bn_sep_5x5_2"]),
    ("avg_pool_3x3", ["1x1", "bn_1"]),
    ("none", ["1x1", "bn_1"]),
    ("1x7_7x1", ["pre_1x1", "pre_bn", "1x7", "bn_1x7_7x1", "7x1", "bn", "post_1x1", "post_bn"]),
])
def test_ops_are_named_after_tf_scopes(op, names):
    module = build_op(op, in_ch=8, filters=16, stride=2)
    assert [n for n, m in module.named_children() if list(m.parameters())] == names


def test_identity_and_pool_need_no_projection_when_shapes_agree():
    assert not list(build_op("none", 16, 16, 1).parameters())
    assert not list(build_op("max_pool_3x3", 16, 16, 2).parameters())
    assert list(build_op("none", 16, 16, 2).parameters())  # the stride forces a 1x1 conv


@pytest.mark.parametrize("genotype,stride,states", [
    (NASNET_A_NORMAL, 1, 6), (NASNET_A_REDUCTION, 2, 4), (PNASNET_5, 2, 5),
    (AMOEBANET_A_NORMAL, 1, 4), (AMOEBANET_A_REDUCTION, 2, 5),
])
def test_cell_output_concatenates_listed_states(genotype, stride, states):
    cell = Cell(genotype, in_channels=24, prev_channels=12, prev_is_larger=True, filters=8,
                stride=stride)
    out = cell(torch.randn(2, 24, 10, 10), torch.randn(2, 12, 20, 20))
    assert out.shape == (2, states * 8, 10 // stride, 10 // stride)
    assert cell.out_channels == states * 8


def test_cell_reduces_unused_states_of_another_size():
    # h1 is concatenated but no op strides it, so the output needs cell_output/reduction_1
    genotype = Genotype("skip", combs=(("none", 0, "none", 0),), concat=(1, 2))
    cell = Cell(genotype, in_channels=8, prev_channels=8, prev_is_larger=False, filters=8,
                stride=2)
    assert "reduction_1" in cell.cell_output
    assert cell(torch.randn(1, 8, 6, 6), torch.randn(1, 8, 6, 6)).shape == (1, 16, 3, 3)
