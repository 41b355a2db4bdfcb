"""`imvec cache add HANDLE SOURCE`: strict check, conversion, sha256 recorded and compared."""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import pytest
from conftest import FIXTURES, assert_close
from module_builders import fixture_tensors, shrink_card, tar_directory, write_tf1_hub_module

import imvec
from imvec.cli import main
from imvec.registry import Mirror, find_card
from imvec.weights.cache_add import add_to_cache
from imvec.weights.convert import read_metadata
from imvec.weights.sources import weights_path
from imvec.weights.tf_checkpoint import write_checkpoint

HANDLE = "google/imagenet/nasnet_mobile/feature_vector/3"
EXPECTED = np.load(FIXTURES / "nasnet_mobile_small" / "expected.npz")
INPUTS = np.load(FIXTURES / "nasnet_mobile_small" / "inputs.npy")


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("IMVEC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "tfhub_modules"))
    monkeypatch.setenv("IMVEC_OFFLINE", "1")
    monkeypatch.delenv("IMVEC_MIRROR_BASE", raising=False)
    shrink_card(monkeypatch)


@pytest.fixture
def archive(tmp_path):
    module = write_tf1_hub_module(tmp_path / "module", fixture_tensors(logits=False))
    path = tmp_path / "nasnet_mobile_feature_vector_3.tar.gz"
    tar_directory(module, path)
    return path


def pin(monkeypatch, sha256: str) -> None:
    card = find_card(HANDLE)
    pinned = tuple(Mirror(m.url, m.kind, sha256 if m.kind == "hub_tf1" else None)
                   for m in card.mirrors)
    shrink_card(monkeypatch, mirrors=pinned)


def test_archive_is_checked_converted_and_recorded(archive, capsys):
    assert main(["cache", "add", HANDLE, str(archive)]) == 0
    out = capsys.readouterr().out
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    path = weights_path(find_card(HANDLE))
    assert f"sha256 {sha}" in out and f"weights: {path}" in out
    metadata = read_metadata(path)
    assert metadata["source"] == str(archive) and metadata["source_sha256"] == sha
    assert_close("features", imvec.load(HANDLE)(INPUTS).numpy(), EXPECTED["features"])
    assert main(["cache", "list"]) == 0
    assert f"nasnet_mobile from {archive}, sha256 {sha}" in capsys.readouterr().out


def test_a_different_pinned_sha256_warns_with_both_and_imports(archive, monkeypatch, caplog,
                                                                capsys):
    pin(monkeypatch, "ab" * 32)
    sha = hashlib.sha256(archive.read_bytes()).hexdigest()
    with caplog.at_level(logging.WARNING, logger="imvec"):
        assert main(["cache", "add", HANDLE, str(archive)]) == 0
    assert sha in caplog.text and "ab" * 32 in caplog.text and "Imported anyway" in caplog.text
    out = capsys.readouterr().out
    assert "DIFFERS" in out and "ab" * 32 in out
    assert weights_path(find_card(HANDLE)).is_file()


def test_the_pinned_sha256_is_confirmed(archive, monkeypatch, caplog):
    pin(monkeypatch, hashlib.sha256(archive.read_bytes()).hexdigest())
    done = add_to_cache(HANDLE, archive)
    assert done.pin_matches is True and not caplog.records
    folder = add_to_cache(HANDLE, FIXTURES / "nasnet_mobile_small" / "model.ckpt")
    assert folder.pin_matches is None and folder.replaced  # pins are archives' hashes


def test_incomplete_source_is_refused_and_the_cache_kept(archive, tmp_path, capsys):
    assert main(["cache", "add", HANDLE, str(archive)]) == 0
    path = weights_path(find_card(HANDLE))
    before = path.read_bytes()
    tensors = fixture_tensors(logits=False)
    del tensors["cell_1/comb_iter_0/left/bn_sep_5x5_1/moving_mean"]
    write_checkpoint(tmp_path / "partial" / "model.ckpt", tensors)
    assert main(["cache", "add", HANDLE, str(tmp_path / "partial")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a complete" in err
    assert "1 of the network's" in err and "cell_1/comb_iter_0/left/bn_sep_5x5_1/moving_mean" in err
    assert "kept" in err and path.read_bytes() == before


@pytest.mark.parametrize("source, handle, message", [
    ("mobilenet_v1_025_128", HANDLE, "variable(s) the network does not have: MobilenetV1/"),
    ("nasnet_mobile_small", "google/imagenet/nasnet_large/feature_vector/1",
     "with the wrong shape"),
    ("nasnet_mobile_small", "google/imagenet/nasnet_large/feature_vector/1",
     "It is a complete google/imagenet/nasnet_mobile/classification/3 module."),
    ("amoebanet_a_small", "google/imagenet/nasnet_mobile/classification/3", "no logits layer"),
])
def test_wrong_network_is_refused(source, handle, message, capsys):
    assert main(["cache", "add", handle, str(FIXTURES / source / "model.ckpt")]) == 1
    assert message in capsys.readouterr().err
    assert not weights_path(find_card(handle)).exists()


def test_bad_sources_are_named(tmp_path, capsys):
    for source, message in ((tmp_path / "missing.tar.gz", "does not exist"),
                            ("https://example.org/m.tar.gz", "is a URL"),
                            (tmp_path / "w.safetensors", "already converted")):
        assert main(["cache", "add", HANDLE, str(source)]) == 1
        assert message in capsys.readouterr().err
    assert main(["cache", "add", "nasnet_mobil", str(tmp_path)]) == 1
    assert "did you mean" in capsys.readouterr().err


def test_short_name_with_variant(capsys):
    source = FIXTURES / "nasnet_mobile_small" / "model.ckpt"  # TF-Slim-like, with logits
    assert main(["cache", "add", "nasnet_mobile", str(source), "--variant",
                 "classification"]) == 0
    module = imvec.load("google/imagenet/nasnet_mobile/classification/3")
    assert_close("logits", module(INPUTS).numpy(), EXPECTED["logits"])
