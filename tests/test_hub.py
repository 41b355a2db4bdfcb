"""imvec.hub mirrors the tensorflow_hub calls of the image cards."""

import numpy as np
import pytest
import torch
from conftest import FIXTURES, assert_close

from imvec import hub


@pytest.fixture(scope="module")
def images():
    return np.load(FIXTURES / "nasnet_mobile_small" / "inputs.npy")


@pytest.fixture(scope="module")
def expected():
    return np.load(FIXTURES / "nasnet_mobile_small" / "expected.npz")


def test_module_spec_and_module(converted, images, expected):
    spec = hub.load_module_spec(converted("nasnet_mobile_small"))
    assert spec.get_signature_names()[:2] == ["default", "image_classification"]
    assert hub.get_expected_image_size(spec) == [224, 224]
    assert hub.get_num_image_channels(spec) == 3
    assert repr(spec.get_input_info_dict()["images"]) == "float32 [None, 224, 224, 3]"
    module = hub.Module(spec)
    assert isinstance(module, hub.Module) and module.name == "module"
    height, width = hub.get_expected_image_size(module)
    assert (height, width) == (224, 224)
    features = module(dict(images=images), signature="image_feature_vector", as_dict=True)
    assert_close("features", features["default"].numpy(), expected["features"])
    assert_close("logits", module(images).numpy(), expected["logits"])  # a classifier file
    assert len(module.variables) == len(module.variable_map)


def test_fine_tuning_form(converted, images, expected):
    module = hub.Module(converted("nasnet_mobile_small"), trainable=True, tags={"train"})
    out = module(inputs=dict(images=images, batch_norm_momentum=0.99),
                 signature="image_feature_vector_with_bn_hparams")
    train = np.load(FIXTURES / "nasnet_mobile_small_train" / "expected.npz")
    assert_close("train features", out.detach().numpy(), train["features"])


def test_keras_layer(converted, images, expected):
    layer = hub.KerasLayer(converted("mobilenet_v1_025_128"))
    reference = np.load(FIXTURES / "mobilenet_v1_025_128" / "expected.npz")["features"]
    mobile_images = np.load(FIXTURES / "mobilenet_v1_025_128" / "inputs.npy")
    assert_close("keras layer", layer(mobile_images).numpy(), reference)
    model = torch.nn.Sequential(layer, torch.nn.Linear(256, 5))
    assert model(torch.from_numpy(mobile_images)).shape == (1, 5)
    trainable = hub.KerasLayer(converted("nasnet_mobile_small"), trainable=True,
                               arguments=dict(batch_norm_momentum=0.997))
    assert trainable.signature == "image_feature_vector_with_bn_hparams"
    assert trainable(images).requires_grad


def test_hub_load_signatures(converted, images, expected):
    loaded = hub.load(converted("nasnet_mobile_small"))
    out = loaded.signatures["image_feature_vector"](images=images)
    assert_close("signature", out["default"].numpy(), expected["features"])
