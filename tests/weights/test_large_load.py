"""Full-size loading: AmoebaNet-A's ~468M parameters load without a second copy (heavy)."""

import json
import os
import subprocess
import sys

import pytest
import torch

import imvec
from imvec.registry import find_card
from imvec.weights.convert import FORMAT, save_converted

# Peak RSS of the subprocess itself: /proc's VmHWM (ru_maxrss keeps the pytest process's
# RSS from the fork, which could hide the peak being measured).
KIB = """
def kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))
"""

MEASURE = KIB + """
import sys, imvec
base = kib("VmRSS")
module = imvec.load(sys.argv[1])
print(base * 1024, kib("VmHWM") * 1024, sum(p.numel() for p in module.parameters()))
"""


@pytest.mark.heavy
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
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


CONVERT = KIB + """
import sys
from imvec.weights.convert import convert_checkpoint
base = kib("VmRSS")
convert_checkpoint(sys.argv[1], sys.argv[2], sys.argv[3])
print(base * 1024, kib("VmHWM") * 1024)
"""


@pytest.mark.heavy
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
def test_tf_checkpoint_conversion_holds_one_copy_of_the_weights(tmp_path):
    """Peak RSS while converting: the mapped checkpoint (page cache, counted in RSS) plus one
    copy of the weights; a network with random weights, or a second copy in the PyTorch
    layout, made it 3x."""
    from imvec.weights.mapping import variable_map
    from imvec.weights.tf_checkpoint import write_checkpoint

    with torch.device("meta"):
        net = find_card("pnasnet_large").build()
    net = net.to_empty(device="cpu")
    for tensor in net.state_dict().values():
        tensor.fill_(0.5) if tensor.is_floating_point() else tensor.zero_()
    prefix = tmp_path / "model.ckpt"
    write_checkpoint(prefix, {k: v.detach().numpy() for k, v in variable_map(net).items()})
    del net
    size = sum(p.stat().st_size for p in tmp_path.glob("model.ckpt.data-*"))
    out = tmp_path / "converted.safetensors"
    result = subprocess.run([sys.executable, "-c", CONVERT, str(prefix), "pnasnet_large",
                             str(out)], capture_output=True, text=True, check=True)
    base, peak = map(int, result.stdout.split())
    assert out.stat().st_size > 0.99 * size
    assert peak - base < 2.4 * size, (f"converting a {size / 2**20:.0f} MiB checkpoint raised "
                                      f"peak RSS by {(peak - base) / 2**20:.0f} MiB")
