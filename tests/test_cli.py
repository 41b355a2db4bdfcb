"""The command line: convert, models, card; errors as one line and a non-zero exit."""

import argparse
import errno
import inspect
import json
import re

import numpy as np
import pytest
import torch
from conftest import FIXTURES, TF_FIXTURES, assert_close
from safetensors import safe_open

import imvec
from imvec import cli
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


def test_models_table_shows_the_short_names(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^nasnet_large +feature_vector +331x331 +4032 +84\.7M +"
                     r"google/imagenet/nasnet_large/feature_vector/1 ", out, re.M)
    assert re.search(r"^mobilenet_v1_050_160 +classification +160x160\+ +1001 ", out, re.M)
    assert len(out.strip().splitlines()) == 11
    for line in out.strip().splitlines()[1:]:  # every name shown is one load() takes
        name, variant = line.split()[:2]
        assert imvec.registry.find_card(name, variant).short_name == name
    assert main(["models", "mobilenet*"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3


def test_card_is_markdown_from_the_registry(capsys):
    assert main(["card", "nasnet_mobile"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# google/imagenet/nasnet_mobile/feature_vector/3")
    assert "image_feature_vector_with_bn_hparams" in out and "nasnet-a_mobile_04_10_2017" in out
    assert main(["card", "nasnet_mobil"]) == 1
    assert "did you mean 'nasnet_mobile'" in capsys.readouterr().err


def _commands(parser, prefix=""):
    """(name, parser, its line in the parent's command list) of every (sub)command."""
    for group in parser._subparsers._group_actions if parser._subparsers else ():
        listed = {a.dest: a.help for a in group._choices_actions}
        for name, sub in group.choices.items():
            yield f"{prefix}{name}", sub, listed.get(name)
            yield from _commands(sub, f"{prefix}{name} ")


def test_every_command_has_help():
    commands = list(_commands(build_parser()))
    assert {"extract", "finetune", "predict", "export", "cache add"} <= {n for n, _, _ in commands}
    for name, sub, listed in commands:
        assert listed, f"command {name} has no line in its parent's help"
        assert sub.description, f"command {name} lacks a description"
        for action in sub._actions:
            assert action.help, f"{name} {action.dest} lacks help"
        sub.format_help()  # every %-format in the help texts renders


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"imvec {imvec._version.__version__}"


def test_defaults_and_choices_come_from_the_library():
    from imvec.data.decode import DEFAULT_DECODE_TIMEOUT, DEFAULT_MAX_PIXELS
    from imvec.engines import ENGINES, PRECISIONS
    from imvec.export import FORMATS
    from imvec.extract.job import DEFAULT_ENGINE, RUNNERS, ExtractJob
    from imvec.extract.neighbors import neighbors
    from imvec.finetune.config import PRECISIONS as AUTOCAST
    from imvec.finetune.config import FinetuneConfig
    from imvec.finetune.predict import predict

    commands = {name: sub for name, sub, _ in _commands(build_parser())}

    def action(command, dest):
        (found,) = [a for a in commands[command]._actions if a.dest == dest and a.help
                    != argparse.SUPPRESS]
        return found

    assert action("extract", "precision").choices == tuple(PRECISIONS)
    assert action("finetune", "precision").choices == AUTOCAST
    assert action("extract", "runner").choices == RUNNERS
    assert action("extract", "runner").default == ExtractJob.runner
    for command in ("extract", "predict", "neighbors"):  # the inference engine
        assert action(command, "engine").choices == ENGINES
    assert action("extract", "engine").default is ExtractJob.engine is None
    assert f"default: {DEFAULT_ENGINE}," in action("extract", "engine").help
    assert action("neighbors", "engine").default is inspect.signature(
        neighbors).parameters["engine"].default
    assert action("predict", "engine").default == inspect.signature(
        predict).parameters["engine"].default
    assert action("export", "format").choices == FORMATS
    assert action("extract", "max_pixels").default == DEFAULT_MAX_PIXELS
    assert action("extract", "decode_timeout").default == DEFAULT_DECODE_TIMEOUT
    assert action("extract", "crop").default == ExtractJob.crop
    assert action("predict", "central_fraction").default == inspect.signature(
        predict).parameters["central_fraction"].default
    assert action("finetune", "central_fraction").default == FinetuneConfig.central_fraction
    for command in ("export", "card", "download", "cache add"):
        assert action(command, "variant").choices == imvec.loader.VARIANTS


@pytest.mark.parametrize("command,old,new,dest,value", [
    ("predict", ["--central-crop", "0.5"], ["--crop", "0.5"], "central_fraction", 0.5),
    ("finetune", ["--central-crop", "0.5"], ["--crop", "0.5"], "central_fraction", 0.5),
    ("finetune", ["--image-size", "96"], ["--size", "96"], "image_size", 96),
    ("finetune", ["--random-init"], ["--random-weights"], "random_weights", True),
    ("export", ["--random-init"], ["--random-weights"], "random_weights", True),
    ("finetune", ["--precision", "bf16"], ["--precision", "bfloat16"], "precision",
     "bfloat16"),
    ("extract", ["--precision", "fp32"], ["--precision", "float32"], "precision", "float32"),
    ("extract", ["--image-size", "96"], ["--size", "96"], "size", 96),
])
def test_old_spellings_still_work_with_a_note(command, old, new, dest, value, capsys):
    base = {"predict": ["predict", "x.jpg", "-m", "run"],
            "finetune": ["finetune", "data", "-m", "nasnet_mobile", "-o", "run"],
            "export": ["export", "nasnet_mobile", "-o", "x.onnx"],
            "extract": ["extract", "images", "-m", "nasnet_mobile", "-o", "x.parquet"]}[command]
    parser = build_parser()
    now = parser.parse_args(base + new)
    assert getattr(now, dest) == value and capsys.readouterr().err == ""
    before = parser.parse_args(base + old)
    assert getattr(before, dest) == value
    err = capsys.readouterr().err
    assert "deprecated" in err and " ".join(new[:1]) in err and len(err.splitlines()) == 1
    assert vars(before) == vars(now)
    shown = commands_help(parser, command)  # only the new spelling is shown
    assert (old[0] if old[0] != new[0] else old[1]) not in shown


@pytest.mark.parametrize("runner", ["local", "ray"])
def test_engine_local_or_ray_is_the_old_spelling_of_runner(runner, capsys):
    """--engine said where the job runs; it now takes the inference engine, and its old
    values go to --runner with a one-line note."""
    base = ["extract", "images", "-m", "nasnet_mobile", "-o", "x.parquet"]
    parser = build_parser()
    now = parser.parse_args([*base, "--runner", runner])
    assert (now.runner, now.engine) == (runner, None) and capsys.readouterr().err == ""
    for old in (["--engine", runner], [f"--engine={runner}"]):
        before = parser.parse_args(base + old)
        assert capsys.readouterr().err == (f"imvec: --engine {runner} is deprecated and will "
                                           f"be removed; use --runner {runner}\n")
        assert vars(before) == vars(now)
    both = parser.parse_args([*base, "--engine", runner, "--engine", "faithful"])
    assert (both.runner, both.engine) == (runner, "faithful")
    capsys.readouterr()
    shown = commands_help(parser, "extract")  # the old values are not offered
    assert "--engine {auto,fast,compile,onnxruntime,faithful}" in " ".join(shown.split())
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--engine", "spark"])
    assert "invalid choice: 'spark' (choose from 'auto', 'fast'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # predict never had them
        parser.parse_args(["predict", "x.jpg", "-m", "run", "--engine", runner])


def test_predict_engine_reaches_the_module(tmp_path, monkeypatch, capsys):
    import importlib

    from PIL import Image

    from imvec import hub

    predict = importlib.import_module("imvec.finetune.predict")  # the module, not the function
    weights = tmp_path / "classifier.safetensors"
    hub.Module.export(imvec.load("mobilenet_v1_050_160", variant="classification",
                                 pretrained=False), weights)
    Image.fromarray(np.full((40, 50, 3), 90, np.uint8)).save(tmp_path / "x.jpg")
    loaded, real_load = [], predict.load

    def load(*args, **kwargs):
        loaded.append(real_load(*args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(predict, "load", load)
    monkeypatch.setenv("IMVEC_ENGINE", "fast")  # the default, "auto", picks it
    outputs = []
    for option in ([], ["--engine", "faithful"]):
        assert main(["predict", str(tmp_path / "x.jpg"), "-m", str(weights), "--json",
                     *option]) == 0
        (line,) = capsys.readouterr().out.splitlines()
        outputs.append(json.loads(line)["labels"])
    assert [module.engine for module in loaded] == ["fast", "faithful"]
    fast, faithful = ([(x["label"], x["probability"]) for x in o] for o in outputs)
    assert [label for label, _ in fast] == [label for label, _ in faithful]
    np.testing.assert_allclose([p for _, p in fast], [p for _, p in faithful], atol=2e-6)


def commands_help(parser, command):
    return {n: s for n, s, _ in _commands(parser)}[command].format_help()


def test_a_bad_device_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    args = ["extract", str(tmp_path), "-m", "nasnet_mobile", "-o", str(tmp_path / "o.parquet")]
    assert main([*args, "--device", "gpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown device 'gpu'" in err[0] and "cuda" in err[0]
    monkeypatch.setattr(torch.version, "cuda", None)  # as on a CPU-only build of torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for command in (args, ["finetune", str(tmp_path), "-m", "nasnet_mobile", "-o",
                           str(tmp_path / "run")]):
        assert main([*command, "--device", "cuda"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no CUDA support" in err[0] and "--device cpu" in err[0]
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("error,expected", [
    (OSError(errno.ENOSPC, "No space left on device", "/data/out.parquet"),
     "No space left on device: /data/out.parquet; free some space or write elsewhere"),
    (PermissionError(errno.EACCES, "Permission denied", "/data/out.parquet"),
     "Permission denied: /data/out.parquet; check the permissions or write elsewhere"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/x"),
     "No such file or directory: /data/x"),
    (ValueError("crop must be a fraction in (0, 1]\nsecond line"),
     "crop must be a fraction in (0, 1] second line"),
    (imvec.ImvecError("what, why, fix"), "what, why, fix"),
])
def test_expected_failures_are_one_line(error, expected, capsys, monkeypatch):
    def fails(args):
        raise error

    monkeypatch.setattr(cli, "cmd_card", fails)
    assert main(["card", "nasnet_mobile"]) == 1
    err = capsys.readouterr().err
    assert err == f"imvec card: error: {expected}\n"
    assert main(["card", "nasnet_mobile", "--debug"]) == 1  # --debug: the traceback too
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith(f"imvec card: error: {expected}\n")


def test_a_bug_keeps_its_traceback(monkeypatch):
    def bug(args):
        raise KeyError("internal")

    monkeypatch.setattr(cli, "cmd_card", bug)
    with pytest.raises(KeyError):
        main(["card", "nasnet_mobile"])
