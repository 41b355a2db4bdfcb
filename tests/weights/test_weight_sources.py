"""Every SOURCE form converts to the reference outputs: checkpoint prefix, hub directory,
archive, TF-Slim-like tarball (EMA twins, several shards), URL, registry handle."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import FIXTURES, assert_close
from local_origin import Origin
from module_builders import (
    fixture_tensors,
    hub_archive,
    shrink_card,
    slim_tarball,
    tar_directory,
    write_tf1_hub_module,
)
from safetensors import safe_open

import imvec
from imvec.cli import main
from imvec.errors import UnknownHandleError
from imvec.registry import find_card
from imvec.weights.convert import read_metadata
from imvec.weights.sources import (
    EMA_SUFFIX,
    convert_source,
    identify,
    open_source,
    weights_values,
)
from imvec.weights.tf_checkpoint import write_checkpoint

SMALL = FIXTURES / "nasnet_mobile_small"
HPARAMS = {"num_cells": 3, "num_conv_filters": 12}
EXPECTED = np.load(SMALL / "expected.npz")
INPUTS = np.load(SMALL / "inputs.npy")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("IMVEC_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("IMVEC_OFFLINE", raising=False)
    monkeypatch.delenv("IMVEC_MIRROR_BASE", raising=False)
    return tmp_path / "home"


def features_of(path, variant=None) -> np.ndarray:
    return imvec.load(path, variant=variant)(INPUTS).numpy()


def convert(source, tmp_path, **options):
    options.setdefault("arch", "nasnet_mobile")
    return convert_source(source, tmp_path / "out.safetensors", hparams=HPARAMS, **options)


def tensors_of(path) -> dict:
    with safe_open(str(path), framework="np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)


def test_checkpoint_prefix_index_file_and_folder(tmp_path):
    out = convert(SMALL / "model.ckpt", tmp_path)
    assert_close("prefix features", features_of(out), EXPECTED["features"])
    reference = tensors_of(out)
    for source in (SMALL / "model.ckpt.index", SMALL):
        other = tensors_of(convert_source(source, tmp_path / "o.safetensors",
                                          arch="nasnet_mobile", hparams=HPARAMS))
        assert other.keys() == reference.keys()
        assert all(np.array_equal(other[k], reference[k]) for k in reference), source


def test_tf1_hub_directory_and_its_archive(tmp_path):
    module = write_tf1_hub_module(tmp_path / "module", fixture_tensors())
    out = convert(module, tmp_path)
    assert_close("hub dir logits", features_of(out, "classification"), EXPECTED["logits"])
    archive = tmp_path / "module.tar.gz"
    tar_directory(module, archive)
    out = convert(archive, tmp_path)
    assert_close("hub archive features", features_of(out), EXPECTED["features"])
    assert read_metadata(out)["source"] == str(archive)
    assert not any((tmp_path / "home" / "tmp").iterdir())  # unpacked copy removed


def test_slim_tarball_gives_raw_values_by_default_and_ema_on_request(tmp_path):
    archive, ema = slim_tarball(tmp_path)
    with open_source(archive, "nasnet_mobile") as opened:
        assert opened.tensors.ema_count == 0 and opened.layout == "checkpoint"
        assert opened.tensors.values == "raw"
        assert not any(k.endswith(EMA_SUFFIX) for k in opened.tensors)
    out = convert(archive, tmp_path)
    assert_close("raw weights", features_of(out), EXPECTED["features"])
    assert read_metadata(out)["weights_values"] == "raw"
    with open_source(archive, "nasnet_mobile", prefer_ema=True) as opened:
        assert opened.tensors.ema_count == len(ema)
    averaged = convert(archive, tmp_path, prefer_ema=True)
    assert read_metadata(averaged)["weights_values"] == "ema"
    # the EMA file equals a checkpoint holding only those values under the plain names
    plain = {**fixture_tensors(), **{k.removesuffix(EMA_SUFFIX): v for k, v in ema.items()}}
    write_checkpoint(tmp_path / "plain" / "model.ckpt", plain)
    reference = tensors_of(convert_source(tmp_path / "plain" / "model.ckpt",
                                          tmp_path / "p.safetensors", arch="nasnet_mobile",
                                          hparams=HPARAMS))
    got = tensors_of(averaged)
    assert got.keys() == reference.keys()
    assert all(np.array_equal(got[k], reference[k]) for k in reference)


def test_ema_asked_of_a_source_without_averages_is_refused(tmp_path):
    module = write_tf1_hub_module(tmp_path / "module", fixture_tensors())
    with pytest.raises(imvec.ImvecError, match="holds no /ExponentialMovingAverage copies"):
        convert(module, tmp_path, prefer_ema=True)
    assert read_metadata(convert(module, tmp_path))["weights_values"] == "as saved"


def test_amoebanet_module_values_are_recorded_as_ema():
    class Plain:  # a hub module's tensors: one copy, no twins
        values = "as saved"

    amoeba = find_card("amoebanet_a_n18_f448")
    assert weights_values(Plain(), amoeba, False).startswith("ema (the module's values")
    assert weights_values(Plain(), amoeba, True).startswith("ema")
    assert weights_values(Plain(), find_card("nasnet_mobile"), False) == "as saved"


def test_cli_convert_ema_flag(tmp_path, capsys):
    archive, _ = slim_tarball(tmp_path, num_shards=1)
    out = tmp_path / "e.safetensors"
    assert main(["convert", str(archive), "--arch", "nasnet_mobile", "--hparam",
                 "num_cells=3", "--hparam", "num_conv_filters=12", "--ema", "-o", str(out)]) == 0
    assert read_metadata(out)["weights_values"] == "ema"
    assert main(["convert", str(archive), "--arch", "nasnet_mobile", "--ema", "--no-ema",
                 "-o", str(out)]) == 1
    assert "contradict" in capsys.readouterr().err


def test_several_checkpoints_need_a_choice(tmp_path):
    for name in ("a", "b"):
        write_checkpoint(tmp_path / "two" / name / "model.ckpt", {"x": np.zeros(1)})
    with pytest.raises(imvec.ImvecError, match="several models"):
        convert(tmp_path / "two", tmp_path)


def test_local_sources_need_arch_and_bad_sources_are_named(tmp_path):
    with pytest.raises(ValueError, match="--arch"):
        convert_source(SMALL / "model.ckpt", tmp_path / "o.safetensors")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert(tmp_path / "missing.tar.gz", tmp_path)
    with pytest.raises(ValueError, match="only http"):
        convert("ftp://example.com/model.tar.gz", tmp_path)
    with pytest.raises(UnknownHandleError, match="did you mean"):
        convert("nasnet_mobil", tmp_path)
    with pytest.raises(ValueError, match="names mobilenet_v1"):
        convert("nasnet_mobile", tmp_path, arch="mobilenet_v1_050_160")
    module = imvec.load(SMALL / "model.ckpt", arch="nasnet_mobile", pretrained=False)
    assert module.card.short_name == "nasnet_mobile"


def test_identify():
    card = find_card("nasnet_mobile")
    assert identify("https://tfhub.dev/google/imagenet/nasnet_mobile/feature_vector/3") == card
    slim = next(m for m in card.mirrors if m.kind == "slim_tarball")
    assert identify(slim.url) == card  # the TF-Slim tarball names the network
    assert identify("https://example.org/model.tar.gz") is None
    assert identify(str(SMALL)) is None


def test_url_source_downloads_then_converts(tmp_path):
    with Origin() as origin:
        url = origin.file("/models/module.tar.gz", hub_archive(tmp_path))
        out = convert(url, tmp_path)
        assert_close("URL features", features_of(out), EXPECTED["features"])
        meta = read_metadata(out)
        assert meta["source"] == url and len(meta["source_sha256"]) == 64


def test_cli_convert_handle_without_arch(tmp_path, monkeypatch, capsys):
    shrink_card(monkeypatch)
    with Origin() as origin:
        monkeypatch.setenv("IMVEC_MIRROR_BASE", origin.base)
        origin.file("/tfhub.dev/google/imagenet/nasnet_mobile/classification/3",
                    hub_archive(tmp_path, logits=True))
        out = tmp_path / "c.safetensors"
        assert main(["convert", "google/imagenet/nasnet_mobile/classification/3",
                     "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert_close("handle logits", features_of(out, "classification"), EXPECTED["logits"])
    assert read_metadata(out)["source"].startswith("https://tfhub.dev/")


def test_other_tfhub_versions_download_with_arch(tmp_path, monkeypatch):
    url = "https://tfhub.dev/google/imagenet/nasnet_mobile/feature_vector/1"
    assert identify(url) is None  # not a registry handle: the version differs
    with Origin() as origin:
        monkeypatch.setenv("IMVEC_MIRROR_BASE", origin.base)
        origin.file("/tfhub.dev/google/imagenet/nasnet_mobile/feature_vector/1",
                    hub_archive(tmp_path))
        out = convert(url, tmp_path)
    assert read_metadata(out)["source"] == url + "?tf-hub-format=compressed"
    with pytest.raises(ValueError, match="--arch"):
        convert_source(url, tmp_path / "x.safetensors")
