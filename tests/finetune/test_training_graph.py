"""The training graph that full fine-tuning runs: drop path per cell, dropout, BN updates."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import imvec
from imvec.finetune import FinetuneConfig, finetune
from imvec.nets import cells
from imvec.registry import find_card

DRAWS = 200_000  # per cell: the kept fraction is then within 0.0045 (4 sigma) of its rate


def _layer_schedule(names, keep):
    """TF-Slim v3: cell number n of N (stem and reduction cells counted, in build order)
    keeps 1 - (n + 1) / N * (1 - keep), with the training-step ratio at its final 1."""
    return {name: 1 - (n + 1) / len(names) * (1 - keep) for n, name in enumerate(names)}


def _nasnet_large_order():
    normal = [f"cell_{i}" for i in range(18)]
    return (["cell_stem_0", "cell_stem_1"] + normal[:6] + ["reduction_cell_0"] + normal[6:12]
            + ["reduction_cell_1"] + normal[12:])


def _kept_fraction(comb, side):
    """Run a cell's comb_iter in training mode with identity ops: ones on one side,
    zeros on the other; the output is 1/keep where kept and 0 where dropped."""
    comb.left, comb.right = nn.Identity(), nn.Identity()
    comb.train()
    ones, zeros = torch.ones(DRAWS, 1, 1, 1), torch.zeros(DRAWS, 1, 1, 1)
    out = comb(ones, zeros) if side == 0 else comb(zeros, ones)
    kept = out != 0
    return kept.float().mean().item(), out[kept].unique()


@pytest.mark.parametrize("arch,keep,order", [
    ("nasnet_large", 0.7, _nasnet_large_order()),
    ("pnasnet_large", 0.6, ["cell_stem_0", "cell_stem_1"] + [f"cell_{i}" for i in range(12)]),
    ("amoebanet_a_n18_f448", 0.7, None),
])
def test_drop_path_keep_rates_per_cell_match_the_cards(arch, keep, order):
    torch.manual_seed(0)
    with torch.device("meta"):
        net = find_card(arch).build()
    cell_names = [n for n, m in net.named_children() if isinstance(m, cells.Cell)]
    if order is None:  # AmoebaNet (tensorflow/tpu): one constant rate, no layer scaling
        expected = dict.fromkeys(cell_names, keep)
    else:
        assert cell_names == order
        expected = _layer_schedule(order, keep)
    for name in cell_names:
        comb = getattr(net, name).comb_iter_0
        side = 0 if comb.drops[0] else 1
        rate, values = _kept_fraction(comb, side)
        assert abs(rate - expected[name]) < 0.0045, (name, rate, expected[name])
        torch.testing.assert_close(values, torch.tensor([1 / expected[name]]))


def test_none_ops_are_never_dropped():
    with torch.device("meta"):
        net = find_card("nasnet_large").build()
    combs = [c for c in net.cell_17.children() if isinstance(c, cells.Comb)]
    identity_sides = [(c, side) for c in combs for side in (0, 1) if not c.drops[side]]
    assert identity_sides  # the NASNet-A normal cell adds 'none' (identity) branches
    for comb, side in identity_sides:
        rate, _ = _kept_fraction(comb, side)
        assert rate == 1.0


def test_dropout_is_active_in_the_classification_head_in_train_mode(converted):
    path = converted("nasnet_mobile_small")
    images = np.random.default_rng(0).uniform(0, 1, (4, 224, 224, 3)).astype(np.float32)
    seen = {}

    def hook(module, inputs, output):
        seen["in"], seen["out"] = inputs[0].detach(), output.detach()

    train = imvec.load(path, variant="classification", trainable=True, tags={"train"})
    train.net.final_layer.dropout.register_forward_hook(hook)
    with torch.no_grad():
        train(images)
    dropped = seen["out"] == 0
    assert 0.4 < dropped.float().mean().item() < 0.6  # dense_dropout_keep_prob 0.5
    torch.testing.assert_close(seen["out"][~dropped], 2 * seen["in"][~dropped])
    train.eval()
    with torch.no_grad():
        train(images)
    assert torch.equal(seen["out"], seen["in"])
    frozen = imvec.load(path, variant="classification").train()  # trainable=False
    assert not frozen.net.final_layer.dropout.training
    assert torch.equal(frozen(images), frozen(images))  # no dropout noise
    mobilenet = imvec.load("mobilenet_v1_050_160", variant="classification", pretrained=False,
                           trainable=True, tags={"train"})
    assert mobilenet.net.Logits.Dropout_1b.training
    assert mobilenet.net.Logits.Dropout_1b.p == pytest.approx(0.001)  # keep 0.999


def test_full_mode_trains_on_the_training_graph(converted, tmp_path, monkeypatch):
    """Two SGD steps through the module's training graph (the zero-initialised logits layer
    passes no gradient to the trunk in the first): BN moving averages and weights move,
    drop path runs with the per-cell schedule (7 cells: 2 stem, 3 normal, 2 reduction)."""
    for label, color in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
        for i in range(2):
            (tmp_path / "data" / label).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (64, 64), color).save(tmp_path / "data" / label / f"{i}.png")
    keeps = []

    def counting_drop_path(x, keep_prob):
        keeps.append(round(keep_prob, 6))
        return original(x, keep_prob)

    original = cells.drop_path
    monkeypatch.setattr(cells, "drop_path", counting_drop_path)
    base = converted("nasnet_mobile_small")
    result = finetune(FinetuneConfig(
        str(tmp_path / "data"), str(base), str(tmp_path / "run"), mode="full", epochs=1,
        batch_size=2, val_fraction=0.0, drop_path_keep_prob=0.7, workers=0))
    expected = _layer_schedule(list(range(7)), 0.7)
    assert set(keeps) == {round(k, 6) for k in expected.values()}
    before = imvec.load(base).variable_map
    after = imvec.load(result.model_path, variant="feature_vector").variable_map
    for name in ("conv0_bn/moving_mean", "cell_2/beginning_bn/moving_variance",
                 "conv0/weights"):
        assert not torch.equal(before[name], after[name]), name
    assert imvec.load(result.model_path).class_names == ["a", "b"]
