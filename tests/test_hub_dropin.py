"""The model cards' own usage snippets run on imvec with one changed import (issue 8).

The snippets below are the cards' text as published (tensorflow/tfhub.dev,
assets/docs/google/models/imagenet/<name>/<variant>/<version>.md at 81fdea8), run with
``exec`` after exactly two replacements: the import line, and the card's ``images = ...``
placeholder by a concrete array. The three v1 cards (NASNet-A large, PNASNet-5 large,
AmoebaNet-A) give their fine-tuning form in prose only ("import the graph version with tag
set {"train"}"), so that form is the feature-vector snippet with ``trainable=True,
tags={"train"}`` added to the ``hub.Module`` call.

Weights: every handle is imported with ``imvec cache add`` from the TF reference fixtures
(hub archive, hub module folder, TF2 SavedModel, checkpoint prefix, checkpoint folder), with
the network offline. The fixtures are reduced networks, so each card's hyper-parameters are
shrunk to the fixture's in the registry index (as the weights-store tests do): the handle
strings stay the real ones, and ``cache add`` checks the fixture against the network that
card describes. Results are compared with the same computation through ``imvec.load`` and
with TensorFlow's outputs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FIXTURES, TF_FIXTURES, assert_close

sys.path.insert(0, str(Path(__file__).parent / "weights"))
import module_builders  # noqa: E402
from module_builders import (  # noqa: E402
    fixture_tensors,
    shrink_card,
    tar_directory,
    write_tf1_hub_module,
)

import imvec  # noqa: E402
from imvec import hub  # noqa: E402
from imvec.cli import main  # noqa: E402
from imvec.weights import sources  # noqa: E402
from imvec.weights.sources import weights_path  # noqa: E402

URL = "https://tfhub.dev/google/imagenet/"
# network short name -> reference fixture
FIXTURE = {"nasnet_mobile": "nasnet_mobile_small", "mobilenet_v1_050_160": "mobilenet_v1_025_128",
           "nasnet_large": "nasnet_large_small", "pnasnet_large": "pnasnet_large_small",
           "amoebanet_a_n18_f448": "amoebanet_a_small"}
VERSION = {"nasnet_mobile": 3, "mobilenet_v1_050_160": 3, "nasnet_large": 1,
           "pnasnet_large": 1, "amoebanet_a_n18_f448": 1}

FEATURE_VECTOR_SNIPPETS = {
    "nasnet_mobile": '''\
module = hub.Module("https://tfhub.dev/google/imagenet/nasnet_mobile/feature_vector/3")
height, width = hub.get_expected_image_size(module)
images = ...  # A batch of images with shape [batch_size, height, width, 3].
features = module(images)  # Features with shape [batch_size, num_features].
''',
    "mobilenet_v1_050_160": '''\
module = hub.Module("https://tfhub.dev/google/imagenet/mobilenet_v1_050_160/feature_vector/3")
height, width = hub.get_expected_image_size(module)
images = ...  # A batch of images with shape [batch_size, height, width, 3].
features = module(images)  # Features with shape [batch_size, num_features].
''',
    "nasnet_large": '''\
module = hub.Module("https://tfhub.dev/google/imagenet/nasnet_large/feature_vector/1")
height, width = hub.get_expected_image_size(module)
images = ...  # A batch of images with shape [batch_size, height, width, 3].
features = module(images)  # Features with shape [batch_size, num_features].
''',
    "pnasnet_large": '''\
module = hub.Module("https://tfhub.dev/google/imagenet/pnasnet_large/feature_vector/1")
height, width = hub.get_expected_image_size(module)
images = ...  # A batch of images with shape [batch_size, height, width, 3].
features = module(images)  # Features with shape [batch_size, num_features].
''',
    "amoebanet_a_n18_f448": '''\
module = hub.Module("https://tfhub.dev/google/imagenet/amoebanet_a_n18_f448/feature_vector/1")
height, width = hub.get_expected_image_size(module)
images = ...  # A batch of images with shape [batch_size, height, width, 3].
features = module(images)  # Features with shape [batch_size, num_features].
''',
}
FINE_TUNING_SNIPPETS = {  # the v3 cards' "Fine-tuning" section
    "nasnet_mobile": '''\
module = hub.Module("https://tfhub.dev/google/imagenet/nasnet_mobile/feature_vector/3",
                    trainable=True, tags={"train"})
features = module(inputs=dict(images=images, batch_norm_momentum=0.997),
                  signature="image_feature_vector_with_bn_hparams")
''',
    "mobilenet_v1_050_160": '''\
module = hub.Module("https://tfhub.dev/google/imagenet/mobilenet_v1_050_160/feature_vector/3",
                    trainable=True, tags={"train"})
features = module(inputs=dict(images=images, batch_norm_momentum=0.997),
                  signature="image_feature_vector_with_bn_hparams")
''',
}
CLASSIFICATION_SNIPPET = '''\
module = hub.Module("https://tfhub.dev/google/imagenet/nasnet_mobile/classification/3")
height, width = hub.get_expected_image_size(module)
images = ...  # A batch of images with shape [batch_size, height, width, 3].
logits = module(images)  # Logits with shape [batch_size, num_classes].
'''


def run_card_code(snippet: str, images: np.ndarray) -> dict:
    """The card's code under ``import tensorflow_hub as hub``, with the import line changed
    and ``images = ...`` given a value; both replacements must happen exactly once."""
    program = "import tensorflow_hub as hub\n" + snippet
    for old, new in (("import tensorflow_hub as hub", "from imvec import hub"),
                     ("images = ...", "images = concrete_images")):
        if old == "images = ..." and old not in snippet:
            continue  # the fine-tuning form takes ``images`` from the code around it
        assert program.count(old) == 1, old
        program = program.replace(old, new)
    namespace = {"concrete_images": images, "images": images}
    exec(compile(program, "<card snippet>", "exec"), namespace)
    return namespace


def inputs(name: str) -> np.ndarray:
    return np.load(FIXTURES / FIXTURE[name] / "inputs.npy")


def expected(name: str) -> dict:
    return dict(np.load(FIXTURES / FIXTURE[name] / "expected.npz"))


def handle(name: str, variant: str = "feature_vector") -> str:
    return f"google/imagenet/{name}/{variant}/{VERSION[name]}"


def hub_module(tmp: Path, fixture: str, logits: bool) -> Path:
    return write_tf1_hub_module(tmp / f"{fixture}_{logits}", fixture_tensors(fixture, logits))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """All five feature-vector handles (and one classification handle) imported with
    `imvec cache add` from the fixtures, in a fresh offline $IMVEC_HOME."""
    tmp = tmp_path_factory.mktemp("dropin")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMVEC_HOME", str(tmp / "home"))
        mp.setenv("TFHUB_CACHE_DIR", str(tmp / "tfhub_modules"))  # empty: not used here
        mp.setenv("IMVEC_OFFLINE", "1")  # nothing may be downloaded
        mp.delenv("IMVEC_MIRROR_BASE", raising=False)
        for name, fixture in FIXTURE.items():
            mp.setitem(module_builders.SMALL, name, TF_FIXTURES[fixture][2])
            shrink_card(mp, name)
        archive = tmp / "nasnet_mobile_fv.tar.gz"
        tar_directory(hub_module(tmp, "nasnet_mobile_small", logits=False), archive)
        sources = {
            handle("nasnet_mobile"): archive,  # a hub module archive as tfhub.dev serves it
            handle("nasnet_mobile", "classification"):  # an unpacked hub module
                hub_module(tmp, "nasnet_mobile_small", logits=True),
            handle("mobilenet_v1_050_160"):  # a TF2 SavedModel written by TensorFlow
                FIXTURES / "savedmodel" / "mobilenet_v1_025_128_tf2",
            handle("nasnet_large"): FIXTURES / "nasnet_large_small" / "model.ckpt",  # prefix
            handle("pnasnet_large"): hub_module(tmp, "pnasnet_large_small", logits=False),
            handle("amoebanet_a_n18_f448"): FIXTURES / "amoebanet_a_small",  # checkpoint dir
        }
        for name, source in sources.items():
            assert main(["cache", "add", name, str(source)]) == 0, name
        yield sources


@pytest.mark.parametrize("name", list(FEATURE_VECTOR_SNIPPETS))
def test_feature_vector_snippet(imported, name):
    images = inputs(name)
    ns = run_card_code(FEATURE_VECTOR_SNIPPETS[name], images)
    card = imvec.load(handle(name)).card
    assert (ns["height"], ns["width"]) == card.input_size
    assert isinstance(ns["module"], hub.Module) and isinstance(ns["features"], torch.Tensor)
    same = imvec.load(handle(name))(images)
    assert torch.equal(ns["features"], same)
    assert_close(f"{name} features vs TF", ns["features"].numpy(), expected(name)["features"])


@pytest.mark.parametrize("name", list(FINE_TUNING_SNIPPETS))
def test_v3_fine_tuning_snippet(imported, name):
    images = inputs(name)
    ns = run_card_code(FINE_TUNING_SNIPPETS[name], images)
    module, features = ns["module"], ns["features"]
    assert features.requires_grad and module.training
    reference = imvec.load(handle(name), trainable=True, tags={"train"},
                           batch_norm_momentum=0.997)
    theirs = reference.variable_map
    moving = [k for k in theirs if k.endswith(("moving_mean", "moving_variance"))]
    before = {k: theirs[k].clone() for k in moving}
    assert torch.equal(features, reference(images))
    ours = module.variable_map
    assert not torch.equal(ours[moving[0]], before[moving[0]])  # updated by the call ...
    for key in moving:  # ... with decay 0.997 (a float32 input there: last-bit differences)
        assert_close(key, ours[key].numpy(), theirs[key].numpy(), 1e-6)
    assert module.batch_norm_momentum == 0.99  # 0.997 applied to that call only
    if name == "nasnet_mobile":
        check_against_tensorflow_training_graph(features, ours)


def check_against_tensorflow_training_graph(features: torch.Tensor, variables: dict) -> None:
    """TF's training graph on the same weights (decay 0.99 there): same features, and the
    batch statistics recovered from TF's update give the update with decay 0.997."""
    train = np.load(FIXTURES / "nasnet_mobile_small_train" / "expected.npz")
    assert_close("train features", features.detach().numpy(), train["features"])
    for key in [k.removeprefix("after/") for k in train.files if k.startswith("after/")]:
        before, after = train[f"before/{key}"], train[f"after/{key}"]
        batch = (after - 0.99 * before) / 0.01
        assert_close(key, variables[key].numpy(), 0.997 * before + 0.003 * batch, 1e-4)


@pytest.mark.parametrize("name", ["nasnet_large", "pnasnet_large", "amoebanet_a_n18_f448"])
def test_v1_fine_tuning_form(imported, name):
    snippet = FEATURE_VECTOR_SNIPPETS[name]
    call = f'hub.Module("{URL}{handle(name).removeprefix("google/imagenet/")}")'
    assert snippet.count(call) == 1
    snippet = snippet.replace(call, call[:-1] + ', trainable=True, tags={"train"})')
    images = inputs(name)
    torch.manual_seed(0)
    ns = run_card_code(snippet, images)
    torch.manual_seed(0)
    reference = imvec.load(handle(name), trainable=True, tags={"train"})(images)
    assert ns["module"].training and torch.equal(ns["features"], reference)
    assert ns["features"].requires_grad
    assert "image_feature_vector_with_bn_hparams" not in ns["module"].get_signature_names()


def test_classification_snippet(imported):
    images = inputs("nasnet_mobile")
    ns = run_card_code(CLASSIFICATION_SNIPPET, images)
    assert_close("logits", ns["logits"].numpy(), expected("nasnet_mobile")["logits"])
    same = imvec.load(handle("nasnet_mobile", "classification"))(images)
    assert torch.equal(ns["logits"], same)


def test_signatures_come_from_the_card(imported):
    """The archive holds no signatures at all (its saved_model.pb has empty graphs); the
    v3 handle still has the batch-norm signature, the v1 handle not."""
    module = hub.Module(URL + "nasnet_mobile/feature_vector/3")
    assert module.get_signature_names() == ["default", "image_feature_vector",
                                            "image_feature_vector_with_bn_hparams"]
    info = module.get_input_info_dict("image_feature_vector_with_bn_hparams")
    assert set(info) == {"images", "batch_norm_momentum"}
    large = hub.Module(URL + "nasnet_large/feature_vector/1")
    with pytest.raises(ValueError, match="has no signature"):
        large(dict(images=inputs("nasnet_large"), batch_norm_momentum=0.9),
              signature="image_feature_vector_with_bn_hparams")


def test_tf2_style_calls_on_imported_weights(imported):
    images = inputs("mobilenet_v1_050_160")
    reference = expected("mobilenet_v1_050_160")["features"]
    layer = hub.KerasLayer(URL + "mobilenet_v1_050_160/feature_vector/3", trainable=False)
    model = torch.nn.Sequential(layer, torch.nn.Linear(256, 3))
    assert model(torch.from_numpy(images)).shape == (1, 3)
    assert_close("KerasLayer", layer(images).numpy(), reference)
    loaded = hub.load(URL + "mobilenet_v1_050_160/feature_vector/3")
    assert_close("hub.load", loaded.signatures["default"](images=images)["default"].numpy(),
                 reference)
    assert hub.resolve(URL + "mobilenet_v1_050_160/feature_vector/3") == str(
        weights_path(layer.module.card))


def test_local_modules_are_recognised_by_their_variables(imported, monkeypatch):
    images = inputs("nasnet_mobile")
    archive = imported[handle("nasnet_mobile")]
    spec = hub.load_module_spec(archive)
    assert spec.card.handle == handle("nasnet_mobile")
    assert_close("archive", hub.Module(spec)(images).numpy(), expected("nasnet_mobile")["features"])

    def unpack(*args, **kwargs):
        raise AssertionError("unpacked again")

    monkeypatch.setattr(sources, "open_source", unpack)  # converted once: known from now on
    assert hub.load_module_spec(archive).card.handle == handle("nasnet_mobile")
    monkeypatch.undo()
    folder = imported[handle("nasnet_mobile", "classification")]  # has the logits layer
    module = hub.Module(folder)
    assert module.card.handle == handle("nasnet_mobile", "classification")
    assert_close("folder logits", module(images).numpy(), expected("nasnet_mobile")["logits"])
    prefix = FIXTURES / "nasnet_mobile_small" / "model.ckpt"  # TF-Slim-like, with logits
    assert hub.load_module_spec(prefix).card.variant == "classification"
    assert hub.load_module_spec(prefix, arch="nasnet_mobile").card.variant == "feature_vector"
    mobile = hub.load_module_spec(FIXTURES / "mobilenet_v1_025_128" / "model.ckpt")
    assert mobile.card.handle == handle("mobilenet_v1_050_160")


def test_unknown_local_module_names_the_closest_network(imported, tmp_path):
    tensors = fixture_tensors("mobilenet_v1_025_128", logits=False)
    tensors["MobilenetV1/Conv2d_0/weights"] = np.zeros((3, 3, 3, 16), np.float32)
    folder = write_tf1_hub_module(tmp_path / "odd", tensors)
    with pytest.raises(imvec.CheckpointMismatchError,
                       match=r"closest is google/imagenet/mobilenet_v1_050_160/feature_vector/3"
                             r".*1 with the wrong shape: MobilenetV1/Conv2d_0/weights"):
        hub.load_module_spec(folder)


def test_export_writes_what_hub_module_reopens(imported, tmp_path):
    module = hub.Module(URL + "nasnet_mobile/feature_vector/3", trainable=True, tags={"train"})
    with torch.no_grad():
        module.variable_map["conv0/weights"].mul_(0.5)  # "fine-tuned"
    module.eval()
    images = inputs("nasnet_mobile")
    path = module.export(tmp_path / "exported")
    assert path.name == "exported.safetensors"
    again = hub.Module(path)
    assert again.card.handle == handle("nasnet_mobile")
    assert_close("exported", again(images).numpy(), module(images).detach().numpy())
    with pytest.raises(ValueError, match="no tf.Session"):
        module.export(tmp_path / "x", object())
