"""Demo weights and images made from an installed package: `imvec demo DIR`."""

import runpy
import sys
from pathlib import Path

import numpy as np
from conftest import FIXTURES, assert_close

import imvec
from imvec.cli import main
from imvec.demo import DEMO_NOTE, demo_tensors
from imvec.weights.convert import read_metadata
from imvec.weights.tf_checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def test_demo_weights_are_the_tf_fixture_checkpoint_value_for_value():
    """Derived without tests/fixtures, they equal the checkpoint TensorFlow wrote there."""
    checkpoint = read_checkpoint(FIXTURES / "nasnet_mobile_small" / "model.ckpt")
    ours = demo_tensors()
    assert set(ours) == set(checkpoint) and len(ours) > 400
    unequal = [n for n, v in ours.items() if not np.array_equal(v, checkpoint[n])]
    assert not unequal, f"values differ from the TF checkpoint: {unequal[:5]}"


def test_imvec_demo_writes_images_and_labelled_weights(tmp_path, capsys):
    assert main(["demo", str(tmp_path / "demo")]) == 0
    assert "imvec extract" in capsys.readouterr().out
    files = sorted((tmp_path / "demo" / "images").rglob("*.*"))
    assert len(files) == 41 and {f.parent.name for f in files} == {"stripes", "blobs", "photo"}
    weights = tmp_path / "demo" / "nasnet_mobile_small.safetensors"
    metadata = read_metadata(weights)
    assert metadata["source"] == DEMO_NOTE and "not real ImageNet weights" in DEMO_NOTE
    reference = np.load(FIXTURES / "nasnet_mobile_small" / "expected.npz")
    inputs = np.load(FIXTURES / "nasnet_mobile_small" / "inputs.npy")
    module = imvec.load(weights, engine="faithful")  # the graph as built: no engine to export
    assert_close("features", module(inputs).numpy(), reference["features"])


def test_the_example_script_still_makes_the_demo(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["make_demo.py", str(tmp_path / "d")])
    try:
        runpy.run_path(str(ROOT / "examples" / "make_demo.py"), run_name="__main__")
    except SystemExit as exit_:
        assert exit_.code == 0
    assert (tmp_path / "d" / "nasnet_mobile_small.safetensors").is_file()
    assert len(list((tmp_path / "d" / "images").rglob("*.*"))) == 41
