"""The five networks against the original TensorFlow code: outputs and variable names."""

import numpy as np
import pytest
import torch
from conftest import FIXTURES, TF_FIXTURES, assert_close, read_manifest

import imvec
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


@pytest.mark.parametrize("arch,hparams", [
    ("nasnet_large", {"num_cells": 3, "num_conv_filters": 12}),
    ("amoebanet_a_n18_f448", {"num_cells": 3, "reduction_size": 16}),
])
def test_grad_checkpointing_keeps_gradients_and_bn_statistics(arch, hparams):
    def step(checkpointing):
        torch.manual_seed(0)
        net = imvec.create_model(arch, num_classes=10, **hparams).train()
        net.set_grad_checkpointing(checkpointing)
        x = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(1))
        torch.manual_seed(2)  # drop path masks
        net(x).logsumexp(dim=1).sum().backward()
        return ({n: p.grad.clone() for n, p in net.named_parameters()},
                {n: b.clone() for n, b in net.named_buffers() if "running" in n})

    grads, stats = step(False)
    grads_ckpt, stats_ckpt = step(True)
    assert grads.keys() == grads_ckpt.keys()
    for name in grads:
        torch.testing.assert_close(grads_ckpt[name], grads[name], rtol=1e-5, atol=1e-6,
                                   msg=lambda m, n=name: f"{n}: {m}")
    for name in stats:  # updated once, not twice
        torch.testing.assert_close(stats_ckpt[name], stats[name], rtol=0, atol=0)


def test_feature_maps_of_every_network_are_named_after_tf_end_points():
    for arch, last in [("nasnet_large", "Cell_17"), ("pnasnet_large", "Cell_11"),
                       ("amoebanet_a_n18_f448", "Cell_17"), ("nasnet_mobile", "Cell_11")]:
        card, info = find_card(arch), {}
        with torch.device("meta"):
            card.build().forward_features(torch.empty(1, 3, *card.input_size), info)
        for name in ["Stem", last] + (["Reduction_Cell_0", "Reduction_Cell_1"]
                                      if arch != "pnasnet_large" else ["Cell_4", "Cell_8"]):
            assert name in info, f"{arch} lacks end point {name}"
