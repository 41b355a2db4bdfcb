"""The five networks against the original TensorFlow code: outputs and variable names."""

import numpy as np
import pytest
import torch
from conftest import FIXTURES, TF_FIXTURES, assert_close, read_manifest

from imvec.registry import find_card
from imvec.weights.mapping import ignored, load_tf_variables, tf_bindings, to_tf_layout
from imvec.weights.tf_checkpoint import read_checkpoint


def tf_cases():
    for name in TF_FIXTURES:
        expected = np.load(FIXTURES / name / "expected.npz")
        for key in expected.files:
            yield pytest.param(name, key, id=f"{name}-{key.removeprefix('end_points/')}")


def run_network(name):
    folder, arch, hparams = TF_FIXTURES[name]
    variables = read_checkpoint(FIXTURES / folder / "model.ckpt")
    has_logits = "final_layer/FC/weights" in variables
    card = find_card(arch)
    from imvec.registry import build_network

    net = build_network(card.network, num_classes=1001 if has_logits else None,
                        **{**card.hparams, **hparams}).eval()
    load_tf_variables(net, variables)
    x = torch.from_numpy(np.load(FIXTURES / name / "inputs.npy")).permute(0, 3, 1, 2) * 2 - 1
    end_points = {}
    with torch.no_grad():
        last = net.forward_features(x, end_points)
        outputs = {"features": net.forward_head(last, pre_logits=True)}
        if has_logits:
            outputs["logits"] = net.forward_head(last)
    outputs.update({f"end_points/{k}": v.permute(0, 2, 3, 1) for k, v in end_points.items()})
    if "Stem" in end_points:  # AmoebaNet's TF end point is named after the cell scope
        outputs["end_points/cell_stem_1"] = outputs["end_points/Stem"]
    return outputs


_RUNS = {}


@pytest.mark.parametrize("name,key", list(tf_cases()))
def test_matches_tf(name, key):
    if name not in _RUNS:
        _RUNS[name] = run_network(name)
    expected = np.load(FIXTURES / name / "expected.npz")[key]
    assert_close(f"{name} {key}", _RUNS[name][key].numpy(), expected)


MANIFESTS = {
    "nasnet_mobile": ("nasnet_mobile", {}),
    "mobilenet_v1_050_160": ("mobilenet_v1", {"depth_multiplier": 0.5}),
    "nasnet_large": ("nasnet_large", {}),
    "pnasnet_large": ("pnasnet_large", {}),
    "amoebanet_a": ("amoebanet_a", {}),
}


@pytest.mark.parametrize("manifest", list(MANIFESTS))
def test_full_network_names_exactly_the_tf_variables(manifest):
    from imvec.registry import build_network

    network, hparams = MANIFESTS[manifest]
    with torch.device("meta"):
        net = build_network(network, num_classes=1001, **hparams)
    state = net.state_dict()
    ours = {name: list(to_tf_layout(state[b.param], b.layout).shape)
            for name, b in tf_bindings(net).items()}
    tf = {k: v for k, v in read_manifest(FIXTURES / "manifests" / manifest / "variables.tsv")
          .items() if not ignored(k)}
    assert sorted(set(ours) - set(tf)) == [], "names TF does not have"
    assert sorted(set(tf) - set(ours)) == [], "TF names we lack"
    assert {k: v for k, v in ours.items() if v != tf[k]} == {}, "shapes differ"


@pytest.mark.parametrize("arch", ["nasnet_large", "nasnet_mobile", "pnasnet_large",
                                  "amoebanet_a_n18_f448", "mobilenet_v1_050_160"])
def test_every_card_builds_with_its_feature_size(arch):
    card = find_card(arch)
    with torch.device("meta"):
        net = card.build()
        h, w = card.input_size
        out = net(torch.empty(1, 3, h, w))
    assert out.shape == (1, card.num_features) and net.num_features == card.num_features


def test_drop_path_keep_probability_per_cell():
    with torch.device("meta"):
        large = find_card("nasnet_large").build()
        pnas = find_card("pnasnet_large").build()
        amoeba = find_card("amoebanet_a_n18_f448").build()
    keep = large.cell_keep_probs(0.7)
    # TF-Slim v3: 1 - (cell_num + 1) / 22 * 0.3, counting stem and reduction cells
    assert keep["cell_stem_0"] == pytest.approx(1 - 1 / 22 * 0.3)
    assert keep["reduction_cell_0"] == pytest.approx(1 - 9 / 22 * 0.3)
    assert keep["cell_17"] == pytest.approx(0.7)
    assert len(keep) == 22
    assert pnas.cell_keep_probs(0.6)["cell_0"] == pytest.approx(1 - 3 / 14 * 0.4)
    assert set(amoeba.cell_keep_probs(0.7).values()) == {0.7}
