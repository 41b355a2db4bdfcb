"""The generic TF-name rule: strict loading, knowingly ignored entries, TF layouts."""

import numpy as np
import pytest
import torch
from conftest import FIXTURES

from imvec.errors import CheckpointMismatchError
from imvec.nets.mobilenet_v1 import mobilenet_v1
from imvec.nets.nasnet import nasnet_mobile
from imvec.weights.mapping import ignored, load_tf_variables, tf_bindings, variable_map
from imvec.weights.tf_checkpoint import read_checkpoint


@pytest.fixture(scope="module")
def small_mobilenet():
    return read_checkpoint(FIXTURES / "mobilenet_v1_025_128" / "model.ckpt")


def test_generic_rule_examples():
    bindings = tf_bindings(nasnet_mobile(num_classes=1001, num_cells=3, num_conv_filters=12))
    assert bindings["cell_0/comb_iter_0/left/separable_5x5_1/depthwise_weights"].param == \
        "cell_0.comb_iter_0.left.separable_5x5_1.depthwise.weight"
    assert bindings["cell_stem_0/1x1/weights"].layout == "conv"
    assert bindings["conv0_bn/moving_variance"].param == "conv0_bn.running_var"
    assert bindings["final_layer/FC/weights"].layout == "dense"
    assert not any("num_batches_tracked" in b.param for b in bindings.values())
    assert "MobilenetV1/Conv2d_1_depthwise/BatchNorm/gamma" in tf_bindings(mobilenet_v1())


@pytest.mark.parametrize("name,skip", [
    ("aux_11/aux_logits/FC/weights", True), ("global_step", True),
    ("cell_0/1x1/weights/ExponentialMovingAverage", True), ("conv0/weights/Momentum", True),
    ("cell_0/1x1/weights", False), ("final_layer/FC/weights", False),
])
def test_ignored_entries(name, skip):
    assert ignored(name) is skip


def test_extra_and_missing_tensors_are_listed(small_mobilenet):
    variables = dict(small_mobilenet)
    variables["MobilenetV1/Conv2d_99/weights"] = np.zeros((1, 1, 1, 1), np.float32)
    del variables["MobilenetV1/Conv2d_0/BatchNorm/beta"]
    with pytest.raises(CheckpointMismatchError) as info:
        load_tf_variables(mobilenet_v1(depth_multiplier=0.25), variables)
    message = str(info.value)
    assert "MobilenetV1/Conv2d_99/weights" in message
    assert "MobilenetV1/Conv2d_0/BatchNorm/beta" in message


def test_wrong_hparams_give_shape_mismatch(small_mobilenet):
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch.*\(3, 3, 3, 8\)"):
        load_tf_variables(mobilenet_v1(depth_multiplier=0.5), small_mobilenet)


def test_ignored_entries_load_knowingly(small_mobilenet):
    extras = {"global_step": np.int64(5),
              "aux_7/aux_logits/FC/biases": np.zeros(1001, np.float32),
              "MobilenetV1/Conv2d_0/weights/ExponentialMovingAverage":
                  np.zeros((3, 3, 3, 8), np.float32)}
    net = mobilenet_v1(depth_multiplier=0.25)
    load_tf_variables(net, {**small_mobilenet, **extras})
    # Every network tensor holds the checkpoint's value; the extras went nowhere.
    loaded = variable_map(net)
    assert set(loaded) == set(small_mobilenet)
    for name, value in small_mobilenet.items():
        np.testing.assert_array_equal(loaded[name].numpy(), value, err_msg=name)
    # The same entries under names that are not knowingly ignored are refused, by name.
    with pytest.raises(CheckpointMismatchError, match="aux7/aux_logits/FC/biases"):
        load_tf_variables(mobilenet_v1(depth_multiplier=0.25),
                          {**small_mobilenet, "aux7/aux_logits/FC/biases": extras[
                              "aux_7/aux_logits/FC/biases"]})


def test_variable_map_round_trips_tf_layout_and_is_live(small_mobilenet):
    net = mobilenet_v1(depth_multiplier=0.25)
    load_tf_variables(net, small_mobilenet)
    vmap = variable_map(net)
    assert set(vmap) == set(small_mobilenet)
    for name, value in small_mobilenet.items():
        np.testing.assert_array_equal(vmap[name].numpy(), value, err_msg=name)
    with torch.no_grad():
        net.Conv2d_0.BatchNorm.running_mean.fill_(7.0)
    assert torch.all(vmap["MobilenetV1/Conv2d_0/BatchNorm/moving_mean"] == 7.0)
