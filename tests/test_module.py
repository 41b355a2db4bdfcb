"""The TF-Hub contract: inputs, signatures, introspection, trainable / tags semantics."""

import warnings

import numpy as np
import pytest
import torch
from conftest import FIXTURES, assert_close

import imvec
from imvec.errors import InputError


@pytest.fixture(scope="module")
def mobile(tmp_path_factory):
    return imvec.load("nasnet_mobile", pretrained=False)


@pytest.fixture
def small_nasnet(converted):
    return lambda **kw: imvec.load(converted("nasnet_mobile_small"), **kw)


@pytest.fixture(scope="module")
def tf_inputs():
    return np.load(FIXTURES / "nasnet_mobile_small" / "inputs.npy")


def test_features_from_numpy_and_torch_agree_with_tf(small_nasnet, tf_inputs):
    expected = np.load(FIXTURES / "nasnet_mobile_small" / "expected.npz")
    module = small_nasnet()
    assert_close("features", module(tf_inputs).numpy(), expected["features"])
    assert module.get_output_info_dict()["default"].shape == (None, 288)
    assert_close("features(torch)", module(torch.from_numpy(tf_inputs)).numpy(),
                 expected["features"])
    outputs = module(dict(images=tf_inputs), signature="image_feature_vector", as_dict=True)
    assert_close("Reduction_Cell_1", outputs["Reduction_Cell_1"].numpy(),
                 expected["end_points/Reduction_Cell_1"])
    classifier = imvec.load(module.source, variant="classification")
    assert_close("logits", classifier(tf_inputs).numpy(), expected["logits"])
    features = classifier(tf_inputs, signature="image_feature_vector")
    assert_close("classifier features", features.numpy(), expected["features"])


def test_scaled_images_give_tf_features_through_every_engine(small_nasnet, tf_inputs):
    """The extraction workers' path: ``to_network_range`` then ``forward_scaled``."""
    expected = np.load(FIXTURES / "nasnet_mobile_small" / "expected.npz")["features"]
    scaled = torch.from_numpy(imvec.module.to_network_range(tf_inputs))
    np.testing.assert_array_equal(scaled.numpy(), tf_inputs * np.float32(2) - np.float32(1))
    for options in ({"engine": "fast"}, {"engine": "faithful"}, {"trainable": True}):
        module = small_nasnet(**options)
        with torch.no_grad():
            assert_close(f"forward_scaled {options}", module.forward_scaled(scaled).numpy(),
                         expected)
            np.testing.assert_array_equal(module.forward_scaled(scaled).numpy(),
                                          module(tf_inputs).numpy())


@pytest.mark.parametrize("images,match", [
    (np.zeros((1, 3, 224, 224), np.float32), "looks like NCHW"),
    (np.zeros((224, 224, 3), np.float32), "Add a batch dimension"),
    (np.zeros((1, 160, 160, 3), np.float32), "expects 224x224 images; got 160x160"),
    (np.zeros((1, 224, 224, 3), np.uint8), "dtype uint8.*/ 255"),
    (np.full((1, 224, 224, 3), 255.0, np.float32), r"values in \[255, 255\]"),
    (np.full((1, 224, 224, 3), -0.5, np.float32), r"values in \[-0.5, -0.5\]"),
    ([[0.5]], "got list"),
])
def test_bad_images_get_clear_errors(mobile, images, match):
    with pytest.raises(InputError, match=match) as info:
        mobile(images)
    assert "[B,H,W,3]" in str(info.value) or "224x224" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_nan_images_are_rejected(mobile):
    images = np.full((1, 224, 224, 3), np.nan, np.float32)
    with pytest.raises(InputError, match="nan"):
        mobile(images)


@pytest.mark.parametrize("value,accepted", [
    (-0.0, True), (-5e-5, True), (1 + 5e-5, True), (1.0, True),
    (np.nan, False), (np.inf, False), (-np.inf, False), (1 + 2e-4, False), (-2e-4, False)])
def test_one_value_at_the_edge_of_the_range_decides(mobile, value, accepted):
    images = np.random.default_rng(0).random((2, 224, 224, 3), dtype=np.float32)
    images[1, 200, 17, 2] = value
    if accepted:
        assert mobile(images).shape == (2, 1056)
    else:
        with pytest.raises(InputError, match="values in"):
            mobile(images)


def test_mobilenet_accepts_other_sizes_but_not_tiny_ones():
    module = imvec.load("mobilenet_v1_050_160", pretrained=False)
    assert module(np.random.rand(2, 224, 192, 3).astype(np.float32)).shape == (2, 512)
    with pytest.raises(InputError, match="at least 32x32"):
        module(np.zeros((1, 16, 16, 3), np.float32))
    assert module.get_input_info_dict()["images"].shape == (None, None, None, 3)


def test_signatures_and_info_dicts(mobile):
    assert mobile.get_signature_names() == [
        "default", "image_feature_vector", "image_feature_vector_with_bn_hparams"]
    info = mobile.get_input_info_dict("image_feature_vector_with_bn_hparams")
    assert repr(info["images"]) == "float32 [None, 224, 224, 3]"
    assert info["batch_norm_momentum"].get_shape() == ()
    out = mobile.get_output_info_dict()
    assert repr(out["default"]) == "float32 [None, 1056]"
    assert out["Reduction_Cell_1"].shape == (None, 7, 7, 704)
    with pytest.raises(ValueError, match="no signature 'image_classification'"):
        mobile.get_input_info_dict("image_classification")
    large = imvec.load("nasnet_large", pretrained=False)
    assert large.get_signature_names() == ["default", "image_feature_vector"]
    classifier = imvec.load("google/imagenet/mobilenet_v1_050_160/classification/3",
                            pretrained=False)
    assert classifier.get_signature_names() == [
        "default", "image_classification", "image_feature_vector",
        "image_classification_with_bn_hparams", "image_feature_vector_with_bn_hparams"]
    assert repr(classifier.get_output_info_dict()["default"]) == "float32 [None, 1001]"
    info = classifier.get_output_info_dict("image_feature_vector")
    assert repr(info["default"]) == "float32 [None, 512]"


def test_expected_image_size():
    module = imvec.load("pnasnet_large", pretrained=False)
    assert imvec.get_expected_image_size(module) == (331, 331)
    assert imvec.get_expected_image_size("mobilenet_v1_050_160") == (160, 160)


def test_frozen_module_stays_in_inference_mode(small_nasnet, tf_inputs):
    module = small_nasnet()
    assert not any(p.requires_grad for p in module.parameters())
    before = module(tf_inputs)
    module.train()
    assert not module.net.training
    assert torch.equal(module(tf_inputs), before)
    with pytest.raises(ValueError, match="trainable=True"):
        module.requires_grad_(True)


def test_deepcopy_gives_an_independent_module(small_nasnet, tf_inputs):
    import copy

    expected = np.load(FIXTURES / "nasnet_mobile_small" / "expected.npz")["features"]
    module = small_nasnet()
    module(tf_inputs)  # builds the inference graph, which the copy must not share
    clone = copy.deepcopy(module)
    assert clone.card is module.card
    with torch.no_grad():
        next(iter(clone.net.parameters())).add_(1.0)
    assert_close("original after editing the copy", module(tf_inputs).numpy(), expected)
    assert not np.allclose(clone(tf_inputs).numpy(), expected, rtol=1e-3)


def test_train_tag_needs_trainable():
    with pytest.raises(ValueError, match="needs trainable=True"):
        imvec.load("nasnet_mobile", pretrained=False, tags={"train"})
    with pytest.raises(ValueError, match="unknown tags"):
        imvec.load("nasnet_mobile", pretrained=False, trainable=True, tags={"serve"})


def test_trainable_without_train_tag_keeps_bn_frozen(small_nasnet, tf_inputs):
    module = small_nasnet(trainable=True)
    assert all(p.requires_grad for p in module.parameters())
    module.train()
    assert not module.net.training
    module(tf_inputs).sum().backward()
    assert module.net.conv0.weight.grad is not None


def test_training_graph_matches_tf(small_nasnet, tf_inputs):
    """nasnet_mobile_small_train: BN on batch statistics, moving averages with decay 0.99."""
    expected = np.load(FIXTURES / "nasnet_mobile_small_train" / "expected.npz")
    module = small_nasnet(trainable=True, tags={"train"})
    assert module.net.training
    outputs = module(tf_inputs, as_dict=True)
    assert_close("train features", outputs["default"].detach().numpy(), expected["features"])
    assert_close("train Stem", outputs["Stem"].detach().numpy(), expected["end_points/Stem"])
    variables = module.variable_map
    for key in expected.files:
        if key.startswith("after/"):
            assert_close(key, variables[key.removeprefix("after/")].numpy(), expected[key])


def test_batch_norm_momentum_per_call_and_at_load(small_nasnet, tf_inputs):
    module = small_nasnet(trainable=True, tags={"train"}, batch_norm_momentum=0.9)
    assert module.net.conv0_bn.momentum == pytest.approx(0.1)
    before = module.variable_map["conv0_bn/moving_mean"].clone()
    batch_mean = module.net.conv0_bn  # updated by the call below with decay 0.5
    module(inputs=dict(images=tf_inputs, batch_norm_momentum=0.5),
           signature="image_feature_vector_with_bn_hparams")
    after = module.variable_map["conv0_bn/moving_mean"]
    reference = small_nasnet(trainable=True, tags={"train"}, batch_norm_momentum=0.5)
    reference(tf_inputs)
    torch.testing.assert_close(after, reference.variable_map["conv0_bn/moving_mean"])
    assert not torch.equal(after, before)
    assert batch_mean.momentum == pytest.approx(0.1)  # restored after the call
    with pytest.raises(InputError, match="takes inputs"):
        module(dict(images=tf_inputs, momentum=0.5))


def test_eval_of_training_graph_uses_moving_statistics(small_nasnet, tf_inputs):
    expected = np.load(FIXTURES / "nasnet_mobile_small" / "expected.npz")
    module = small_nasnet(trainable=True, tags={"train"}).eval()
    with torch.no_grad():
        assert_close("eval features", module(tf_inputs).numpy(), expected["features"])


@pytest.mark.parametrize("options", [{}, {"trainable": True}, {"precision": "bfloat16"}])
def test_modules_pickle_and_torch_save(small_nasnet, tf_inputs, options, tmp_path):
    import pickle

    expected = np.load(FIXTURES / "nasnet_mobile_small" / "expected.npz")
    module = small_nasnet(**options).eval()
    tolerance = 0.01 if options.get("precision") else 1e-5
    path = tmp_path / "module.pt"
    torch.save(module, path)
    for twin in (pickle.loads(pickle.dumps(module)), torch.load(path, weights_only=False)):
        assert twin.card == module.card and dict(twin.card.hparams) == dict(module.card.hparams)
        assert (twin.engine, twin.precision, twin.trainable) == (
            module.engine, module.precision, module.trainable)
        with torch.no_grad():
            assert_close("features", twin(tf_inputs).numpy(), expected["features"], tolerance)


def test_batch_norm_momentum_is_checked_and_said_to_do_nothing_without_training(
        small_nasnet, tf_inputs):
    signature = "image_feature_vector_with_bn_hparams"
    with pytest.warns(UserWarning, match="no effect here.*trainable=True"):
        frozen = small_nasnet(batch_norm_momentum=0.9)
    frozen = small_nasnet()
    for bad in (float("nan"), 1.5, -0.1, "0.9x"):
        with pytest.raises(ValueError, match="batch_norm_momentum must be a number in"):
            frozen(inputs=dict(images=tf_inputs, batch_norm_momentum=bad), signature=signature)
        with pytest.raises(ValueError, match="batch_norm_momentum must be a number in"):
            small_nasnet(trainable=True, tags={"train"}, batch_norm_momentum=bad)
    with pytest.warns(UserWarning, match="no effect here"):  # as TF-Hub: accepted, ignored
        out = frozen(inputs=dict(images=tf_inputs, batch_norm_momentum=0.997),
                     signature=signature)
    expected = np.load(FIXTURES / "nasnet_mobile_small" / "expected.npz")
    assert_close("features", out.numpy(), expected["features"])
    training = small_nasnet(trainable=True, tags={"train"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # where it applies there is nothing to say
        training(inputs=dict(images=tf_inputs, batch_norm_momentum=0.997), signature=signature)
