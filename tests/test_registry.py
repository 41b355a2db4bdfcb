"""The registry: ten handles, aliases, URLs, close-match errors, fnmatch listing."""

import pytest

import imvec
from imvec.errors import UnknownHandleError
from imvec.registry import CARDS, _index, find_card, list_models

HANDLES = [
    "google/imagenet/amoebanet_a_n18_f448/feature_vector/1",
    "google/imagenet/nasnet_large/feature_vector/1",
    "google/imagenet/pnasnet_large/feature_vector/1",
    "google/imagenet/nasnet_mobile/feature_vector/3",
    "google/imagenet/mobilenet_v1_050_160/feature_vector/3",
]


def test_ten_handles_with_classification_twins():
    handles = {c.handle for c in CARDS}
    assert len(CARDS) == 10
    for handle in HANDLES:
        assert handle in handles
        assert handle.replace("feature_vector", "classification") in handles


@pytest.mark.parametrize("name", [
    "nasnet_mobile", "google/imagenet/nasnet_mobile/feature_vector/3",
    "https://tfhub.dev/google/imagenet/nasnet_mobile/feature_vector/3",
    "https://tfhub.dev/google/imagenet/nasnet_mobile/feature_vector/3?tf-hub-format=compressed",
])
def test_find_card_accepts_handle_url_and_short_name(name):
    assert find_card(name).handle == "google/imagenet/nasnet_mobile/feature_vector/3"


def test_variant_picks_the_twin_of_a_short_name():
    card = find_card("amoebanet_a_n18_f448", "classification")
    assert card.handle == "google/imagenet/amoebanet_a_n18_f448/classification/1"
    assert card.num_classes == 1001
    with pytest.raises(ValueError, match="contradicts"):
        find_card("google/imagenet/nasnet_large/feature_vector/1", "classification")


def test_unknown_handle_lists_close_matches():
    with pytest.raises(UnknownHandleError, match="did you mean 'nasnet_large'") as info:
        find_card("nasnet_larg")
    assert isinstance(info.value, ValueError)


def test_duplicate_alias_is_an_error():
    duplicate = "duplicate handle or alias 'google/imagenet/nasnet_mobile/"
    with pytest.raises(RuntimeError, match=duplicate):
        _index(CARDS + (CARDS[6],))


def test_list_models_fnmatch():
    assert [c.handle for c in list_models("*nasnet_mobile*", exclude="*classification*")] == [
        "google/imagenet/nasnet_mobile/feature_vector/3"]
    assert len(imvec.list_models()) == 10


def test_card_facts():
    card = find_card("mobilenet_v1_050_160")
    assert card.variable_input_size and card.input_size == (160, 160)
    assert card.hparams["depth_multiplier"] == 0.5
    assert any(m.kind == "slim_tarball" for m in card.mirrors)
    assert all(m.kind == "hub_tf1" for m in find_card("amoebanet_a_n18_f448").mirrors)


def test_create_model_takes_registry_names_and_families():
    net = imvec.create_model("mobilenet_v1_050_160", depth_multiplier=0.25)
    assert net.num_features == 256
    assert imvec.create_model("nasnet_mobile", num_cells=3, num_conv_filters=12).num_features == 288
    with pytest.raises(ValueError, match="unknown hyper-parameter.*num_celss"):
        imvec.create_model("nasnet_mobile", num_celss=3)
