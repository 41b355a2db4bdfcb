"""The command line: convert, models, card; errors as one line and a non-zero exit."""

import re

import numpy as np
import pytest
from conftest import FIXTURES, TF_FIXTURES, assert_close
from safetensors import safe_open

import imvec
from imvec.cli import build_parser, main


@pytest.mark.parametrize("name", list(TF_FIXTURES))
def test_converted_checkpoints_give_tf_outputs(converted, name):
    expected = np.load(FIXTURES / name / "expected.npz")
    module = imvec.load(converted(name))
    images = np.load(FIXTURES / name / "inputs.npy")
    assert_close(f"{name} features", module(images).numpy(), expected["features"])


def test_convert_records_card_metadata(converted):
    path = converted("nasnet_mobile_small")
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
        assert "final_layer.FC.weight" in f.keys()  # noqa: SIM118 (safe_open is not a dict)
    assert metadata["arch"] == "nasnet_mobile" and metadata["num_classes"] == "1001"
    assert '"num_cells": 3' in metadata["hparams"]
    assert len(metadata["source_sha256"]) == 64


def test_feature_vector_file_refuses_classification(converted):
    with pytest.raises(ValueError, match="no logits layer"):
        imvec.load(converted("mobilenet_v1_025_128"), variant="classification")


def test_convert_with_wrong_hparams_fails_with_one_line(tmp_path, capsys):
    args = ["convert", str(FIXTURES / "mobilenet_v1_025_128" / "model.ckpt"),
            "--arch", "mobilenet_v1_050_160", "-o", str(tmp_path / "out.safetensors")]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "shape mismatch" in err[0] and "--hparam" in err[0]
    assert not (tmp_path / "out.safetensors").exists()


def test_convert_missing_checkpoint(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope"), "--arch", "nasnet_mobile",
                 "-o", str(tmp_path / "o.safetensors")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_models_table(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"google/imagenet/nasnet_large/feature_vector/1 +331x331 +4032 +84\.7M", out)
    assert "160x160+" in out and len(out.strip().splitlines()) == 11


def test_card_is_markdown_from_the_registry(capsys):
    assert main(["card", "nasnet_mobile"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# google/imagenet/nasnet_mobile/feature_vector/3")
    assert "image_feature_vector_with_bn_hparams" in out and "nasnet-a_mobile_04_10_2017" in out
    assert main(["card", "nasnet_mobil"]) == 1
    assert "did you mean 'nasnet_mobile'" in capsys.readouterr().err


def test_every_command_has_help():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name, sub in commands.items():
        assert sub.description, f"command {name} lacks a description"
        for action in sub._actions:
            assert action.help, f"{name} {action.dest} lacks help"
