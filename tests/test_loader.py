"""imvec.load(handle) end to end, offline: a server on 127.0.0.1 stands in for tfhub.dev,
Kaggle and GCS (IMVEC_MIRROR_BASE sends the registry's real URLs there); the weights are
downloaded, resumed, verified, converted once, cached, and then load without the network.

The served module holds the nasnet_mobile_small reference weights, so the handle's card is
shrunk to that fixture's hyper-parameters (its mirrors keep their real URLs)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, assert_close

import imvec
from imvec.cli import main
from imvec.registry import find_card
from imvec.weights import sources, store
from imvec.weights.convert import read_metadata

sys.path.insert(0, str(Path(__file__).parent / "weights"))
from local_origin import Origin  # noqa: E402
from module_builders import hub_archive, shrink_card  # noqa: E402

HANDLE = "google/imagenet/nasnet_mobile/feature_vector/3"
TFHUB = "/tfhub.dev/" + HANDLE
KAGGLE = ("/www.kaggle.com/api/v1/models/google/nasnet/tensorFlow1/mobile-feature-vector/2/"
          "download")
KAGGLE_V1 = KAGGLE.replace("/2/download", "/1/download")
SLIM = "/storage.googleapis.com/download.tensorflow.org/models/nasnet-a_mobile_04_10_2017.tar.gz"
TF2 = "/tfhub.dev/google/imagenet/nasnet_mobile/feature_vector/5"
BUCKET = "/storage.googleapis.com/kaggle-models/signed/module.tar.gz"
SMALL = FIXTURES / "nasnet_mobile_small"
EXPECTED = np.load(SMALL / "expected.npz")
INPUTS = np.load(SMALL / "inputs.npy")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("IMVEC_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("IMVEC_OFFLINE", raising=False)
    return tmp_path / "home"


@pytest.fixture
def origin(monkeypatch):
    shrink_card(monkeypatch)
    with Origin() as o:
        monkeypatch.setenv("IMVEC_MIRROR_BASE", o.base)
        yield o


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> bytes:
    return hub_archive(tmp_path_factory.mktemp("hub"))


def test_first_load_downloads_resumes_converts_then_works_offline(origin, archive, monkeypatch):
    origin.redirect(TFHUB, BUCKET)  # tfhub.dev answers with a redirect to a signed GCS URL
    origin.file(BUCKET, archive, drop_after=len(archive) // 3, drops=1)
    module = imvec.load(HANDLE)
    assert_close("downloaded features", module(INPUTS).numpy(), EXPECTED["features"])
    assert [h.get("Range") for h in origin.headers_of(BUCKET)] == [
        None, f"bytes={len(archive) // 3}-"]
    cached = sources.weights_path(module.card)
    assert module.source == str(cached) and cached.parent == store.weights_dir()
    meta = read_metadata(cached)
    assert meta["source"] == f"https://tfhub.dev/{HANDLE}?tf-hub-format=compressed"
    assert meta["source_sha256"] == hashlib.sha256(archive).hexdigest()
    requests = len(origin.requests)
    imvec.load(HANDLE)
    monkeypatch.setenv("IMVEC_OFFLINE", "1")
    again = imvec.load("https://tfhub.dev/" + HANDLE)
    assert_close("cached features", again(INPUTS[:1]).numpy(), EXPECTED["features"][:1])
    assert len(origin.requests) == requests  # loaded from the cache, no network


def test_forbidden_source_falls_through_to_the_next(origin, archive, caplog):
    origin.status(TFHUB, 403)
    origin.redirect(KAGGLE, BUCKET)
    origin.file(BUCKET, archive)
    with caplog.at_level(logging.WARNING, logger="imvec"):
        module = imvec.load("nasnet_mobile")
    assert_close("features via Kaggle", module(INPUTS).numpy(), EXPECTED["features"])
    assert origin.count(TFHUB) == 1 and "403" in caplog.text
    assert read_metadata(sources.weights_path(module.card))["source"].startswith(
        "https://www.kaggle.com/api/v1/models/google/nasnet/")


def test_checksum_mismatch_is_deleted_and_the_next_source_used(origin, archive, monkeypatch):
    card = find_card(HANDLE)
    pinned = (dataclasses.replace(card.mirrors[0], sha256="0" * 64), *card.mirrors[1:])
    shrink_card(monkeypatch, mirrors=pinned)
    origin.file(TFHUB, archive)
    origin.file(KAGGLE, archive)
    module = imvec.load(HANDLE)
    assert_close("features", module(INPUTS[:1]).numpy(), EXPECTED["features"][:1])
    assert not store.download_path(card.mirrors[0].url).exists()
    assert origin.count(KAGGLE) == 1


def test_when_every_source_fails_each_is_named(origin):
    origin.status(TFHUB, 404)
    origin.status(KAGGLE, 403)
    origin.status(KAGGLE_V1, 403)
    origin.file(SLIM, b"<html>not a tarball</html>")
    origin.status(TF2, 410)
    with pytest.raises(store.DownloadError) as info:
        imvec.load(HANDLE)
    message = str(info.value)
    for mirror in find_card(HANDLE).mirrors:
        assert mirror.url in message
    assert "404" in message and "not a tar or zip archive" in message
    assert "a model version that does not exist" in message  # Kaggle's 403
    assert f"imvec cache add {HANDLE} FILE" in message


def test_offline_without_cache_says_what_to_fetch_and_where(origin, monkeypatch, archive):
    monkeypatch.setenv("IMVEC_OFFLINE", "1")
    with pytest.raises(store.OfflineError) as info:
        imvec.load(HANDLE)
    message = str(info.value)
    card = find_card(HANDLE)
    assert str(sources.weights_path(card)) in message and f"imvec download {HANDLE}" in message
    for mirror in card.mirrors:
        assert mirror.url in message and str(store.download_path(mirror.url)) in message
    assert origin.requests == []
    # do as it says: put the hub archive where the message points, still offline
    target = store.download_path(card.mirrors[0].url)
    target.parent.mkdir(parents=True)
    target.write_bytes(archive)
    module = imvec.load(HANDLE)
    assert_close("features", module(INPUTS[:1]).numpy(), EXPECTED["features"][:1])
    assert origin.requests == []


def test_classification_handle_gives_the_logits(origin, tmp_path):
    origin.file("/tfhub.dev/google/imagenet/nasnet_mobile/classification/3",
                hub_archive(tmp_path, logits=True))
    module = imvec.load("nasnet_mobile", variant="classification")
    assert_close("logits", module(INPUTS).numpy(), EXPECTED["logits"])


def test_download_command(origin, archive, capsys):
    origin.redirect(TFHUB, BUCKET)
    origin.file(BUCKET, archive)
    assert main(["download", "nasnet_mobile", "--check"]) == 0
    out = capsys.readouterr().out
    assert f"HTTP 206, {len(archive)} bytes" in out and "HTTP 404" in out
    assert origin.count(BUCKET, "HEAD") == 0  # a ranged GET: signed URLs may refuse HEAD
    assert [h["Range"] for h in origin.headers_of(BUCKET)] == ["bytes=0-0"]
    assert main(["download", HANDLE]) == 0
    out = capsys.readouterr().out
    assert hashlib.sha256(archive).hexdigest() in out
    assert str(sources.weights_path(find_card(HANDLE))) in out


def test_local_sources_load_with_arch_and_convert_once(origin, archive, tmp_path, home):
    module = imvec.load(SMALL / "model.ckpt", arch="nasnet_mobile")
    assert_close("prefix", module(INPUTS[:1]).numpy(), EXPECTED["features"][:1])
    (tmp_path / "module.tar.gz").write_bytes(archive)
    for _ in range(2):
        imvec.load(tmp_path / "module.tar.gz", arch="nasnet_mobile")
    url = origin.file("/models/module.tar.gz", archive)
    imvec.load(url, arch="nasnet_mobile")
    assert len(list((home / "weights").glob("*.safetensors"))) == 3
    with pytest.raises(ValueError, match="arch="):
        imvec.load(SMALL / "model.ckpt")


LOAD_IN_CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
from module_builders import shrink_card_in_process
shrink_card_in_process()
import numpy as np, imvec
module = imvec.load(sys.argv[2])
np.save(sys.argv[3], module(np.load(sys.argv[4])[:1]).numpy())
"""


def test_four_processes_loading_at_once_download_once(origin, archive, tmp_path, home):
    origin.file(TFHUB, archive, chunk_delay=0.02)
    env = {**os.environ, "IMVEC_HOME": str(home), "IMVEC_MIRROR_BASE": origin.base}
    weights = str(Path(__file__).parent / "weights")
    children = [subprocess.Popen([sys.executable, "-c", LOAD_IN_CHILD, weights, HANDLE,
                                  str(tmp_path / f"out{i}.npy"), str(SMALL / "inputs.npy")],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True) for i in range(4)]
    results = [c.communicate(timeout=240) for c in children]
    assert all(c.returncode == 0 for c in children), results
    assert origin.count(TFHUB) == 1
    for i in range(4):
        assert_close(f"process {i}", np.load(tmp_path / f"out{i}.npy"),
                     EXPECTED["features"][:1])


def test_a_misspelt_variant_is_an_error_naming_the_valid_ones(converted):
    with pytest.raises(ValueError, match=r"unknown variant 'classificaton'; did you mean "
                       r"'classification'\? choose one of feature_vector, classification"):
        imvec.load(converted("nasnet_mobile_small"), variant="classificaton")


@pytest.mark.parametrize("key,value,match", [
    ("hparams", '{"num_cells": 3', "'hparams' is not valid JSON"),
    ("hparams", "[1, 2]", "'hparams' is not a JSON object"),
    ("class_names", "[broken", "'class_names' is not valid JSON"),
    ("num_classes", "many", "'num_classes' is 'many', not a count"),
    ("arch", "", "'arch' is missing"),
])
def test_damaged_metadata_is_one_clear_error_naming_the_file(converted, tmp_path, key, value,
                                                              match):
    from safetensors.torch import load_file, save_file

    source = converted("nasnet_mobile_small")
    metadata = {**read_metadata(source), key: value}
    damaged = tmp_path / "damaged.safetensors"
    save_file(load_file(source), str(damaged), metadata=metadata)
    with pytest.raises(imvec.ImvecError, match=f"damaged.safetensors: damaged metadata, {match}"
                       ".*imvec convert"):
        imvec.load(damaged)


def test_hyper_parameters_are_bounded_before_anything_is_built():
    with pytest.raises(ValueError, match=r"num_cells must be in \[1, 64\]; got 3000"):
        imvec.create_model("nasnet_mobile", num_cells=3000)
    with pytest.raises(ValueError, match="num_cells must be an integer"):
        imvec.create_model("pnasnet_large", num_cells=2.5)
    with pytest.raises(ValueError, match=r"depth_multiplier must be in \(0, 8\]"):
        imvec.create_model("mobilenet_v1_050_160", depth_multiplier=0)
    assert imvec.create_model("nasnet_mobile", num_cells=3).num_features == 1056
