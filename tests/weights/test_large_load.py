"""Full-size loading: AmoebaNet-A's ~468M parameters load without a second copy (heavy)."""

import json
import subprocess
import sys

import pytest
import torch

import imvec
from imvec.registry import find_card
from imvec.weights.convert import FORMAT, save_converted

MEASURE = """
import resource, sys, imvec
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
module = imvec.load(sys.argv[1])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(base * 1024, peak * 1024, sum(p.numel() for p in module.parameters()))
"""


@pytest.mark.heavy
def test_amoebanet_loads_within_one_and_a_half_times_the_file(tmp_path):
    card = find_card("amoebanet_a_n18_f448")
    with torch.device("meta"):
        net = card.build()
    # Constant weights are enough to measure memory; they avoid a minute of random init.
    net = net.to_empty(device="cpu")
    for tensor in net.state_dict().values():
        tensor.fill_(0.5) if tensor.is_floating_point() else tensor.zero_()
    path = save_converted(net, tmp_path / "amoebanet.safetensors", {
        "format": FORMAT, "arch": card.short_name, "network": card.network,
        "hparams": json.dumps(dict(card.hparams)), "num_classes": "", "source": "test",
        "source_sha256": ""})
    del net
    size = path.stat().st_size
    result = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True,
                            text=True, check=True)
    base, peak, params = map(int, result.stdout.split())
    assert params > 460e6
    assert peak - base < 1.5 * size, (f"loading a {size / 2**30:.2f} GiB file raised peak RSS "
                                      f"by {(peak - base) / 2**30:.2f} GiB")


@pytest.mark.heavy
@pytest.mark.parametrize("handle", [c.handle for c in imvec.list_models()])
def test_every_handle_builds_and_runs_with_random_weights(handle):
    module = imvec.load(handle, pretrained=False)
    h, w = imvec.get_expected_image_size(module)
    images = torch.rand(1, h, w, 3)
    with torch.no_grad():
        out = module(images)
    expected = module.card.num_features if module.card.variant == "feature_vector" else 1001
    assert out.shape == (1, expected) and torch.isfinite(out).all()
