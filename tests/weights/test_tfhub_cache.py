"""Modules tensorflow_hub already downloaded are read from its cache, not fetched again.

tests/fixtures/tfhub_cache/listing.json was written by tensorflow-hub 0.16.1 itself
(make_tfhub_cache_listing.py): the folder names and descriptor lines below are its own.
"""

from __future__ import annotations

import json
import shutil
import tempfile

import numpy as np
import pytest
from conftest import FIXTURES, assert_close
from local_origin import Origin
from module_builders import SMALL, fixture_tensors, hub_archive, shrink_card, write_tf1_hub_module

import imvec
from imvec import hub
from imvec.cli import main
from imvec.registry import CARDS, find_card
from imvec.weights import sources, tfhub_cache
from imvec.weights.convert import read_metadata

LISTING = json.loads((FIXTURES / "tfhub_cache" / "listing.json").read_text())
HANDLE = "google/imagenet/nasnet_mobile/feature_vector/3"
URL = "https://tfhub.dev/" + HANDLE
EXPECTED = np.load(FIXTURES / "nasnet_mobile_small" / "expected.npz")
INPUTS = np.load(FIXTURES / "nasnet_mobile_small" / "inputs.npy")


@pytest.fixture(autouse=True)
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("IMVEC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "tfhub_modules"))
    monkeypatch.delenv("IMVEC_OFFLINE", raising=False)
    monkeypatch.delenv("IMVEC_MIRROR_BASE", raising=False)
    shrink_card(monkeypatch)
    return tmp_path / "tfhub_modules"


def tensorflow_hub_download(cache, handle, tensors):
    """What tensorflow_hub leaves after downloading ``handle``: the module folder and its
    descriptor beside it."""
    folder = write_tf1_hub_module(cache / tfhub_cache.module_dir_name(handle), tensors)
    (cache / f"{folder.name}.descriptor.txt").write_text(
        f"Module: {handle}\nDownload Time: 2026-11-20 10:00:00\nDownloader Hostname: x (PID:1)")
    return folder


def test_folder_names_are_the_ones_tensorflow_hub_writes(tmp_path):
    records = {r["handle"]: r for r in LISTING["records"]}
    for card in CARDS:
        record = records[card.url]
        assert tfhub_cache.handles_of(card)[0] == card.url
        assert tfhub_cache.module_dir_name(card.url) == record["module_dir"]
        assert record["new_entries"] == [record["module_dir"],
                                         record["module_dir"] + tfhub_cache.DESCRIPTOR_SUFFIX]
        assert record["requested"] == card.mirrors[0].url  # our first source is its request
    for record in LISTING["records"]:  # other spellings are other folders
        assert tfhub_cache.module_dir_name(record["handle"]) == record["module_dir"]
        folder = tmp_path / record["module_dir"]
        folder.mkdir()
        (tmp_path / (folder.name + ".descriptor.txt")).write_text(
            record["descriptor_first_line"] + "\nDownload Time: then\n")
        card = tfhub_cache.card_of_module_dir(folder)
        if "/5" in record["handle"]:  # the TF2 version: named by its folder's hash
            assert card.handle == HANDLE
        else:
            assert card.url == record["handle"].replace("http:", "https:").rstrip("/")


def test_cache_dir_follows_tensorflow_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "x"))
    assert tfhub_cache.cache_dir() == tmp_path / "x"
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "temp"))
    for unset in (lambda: monkeypatch.setenv("TFHUB_CACHE_DIR", ""),
                  lambda: monkeypatch.delenv("TFHUB_CACHE_DIR")):
        unset()
        assert tfhub_cache.cache_dir() == tmp_path / "temp" / "tfhub_modules"


def test_load_uses_the_tfhub_module_offline_and_leaves_it_alone(env, monkeypatch):
    folder = tensorflow_hub_download(env, URL, fixture_tensors(logits=False))
    files = {p: p.read_bytes() for p in env.rglob("*") if p.is_file()}
    monkeypatch.setenv("IMVEC_OFFLINE", "1")
    module = imvec.load(HANDLE)
    assert_close("features", module(INPUTS).numpy(), EXPECTED["features"])
    metadata = read_metadata(sources.weights_path(find_card(HANDLE)))
    assert metadata["source"] == f"{URL} (TF-Hub cache: {folder})"
    assert {p: p.read_bytes() for p in env.rglob("*") if p.is_file()} == files
    spec = hub.load_module_spec(folder)  # the folder itself, named by its descriptor
    assert spec.card.handle == HANDLE
    assert_close("hub.Module(folder)", hub.Module(folder)(INPUTS).numpy(), EXPECTED["features"])


def test_no_request_when_tensorflow_hub_has_it(env, monkeypatch):
    tensorflow_hub_download(env, URL, fixture_tensors(logits=False))
    with Origin() as origin:
        monkeypatch.setenv("IMVEC_MIRROR_BASE", origin.base)
        assert main(["download", HANDLE]) == 0
        assert origin.requests == []


def test_other_spellings_are_found_by_their_descriptor(env):
    spelled = URL + "/"
    tensorflow_hub_download(env, spelled, fixture_tensors(logits=False))
    found = tfhub_cache.find_module(find_card(HANDLE))
    assert found.handle == spelled and found.path.name == tfhub_cache.module_dir_name(spelled)


def test_tf2_version_in_the_cache_serves_the_tf1_handle(env, monkeypatch):
    monkeypatch.setitem(SMALL, "mobilenet_v1_050_160", {"depth_multiplier": 0.25})
    shrink_card(monkeypatch, "mobilenet_v1_050_160")
    handle = "google/imagenet/mobilenet_v1_050_160/feature_vector/3"
    tf2 = "https://tfhub.dev/google/imagenet/mobilenet_v1_050_160/feature_vector/5"
    shutil.copytree(FIXTURES / "savedmodel" / "mobilenet_v1_025_128_tf2",
                    env / tfhub_cache.module_dir_name(tf2))
    monkeypatch.setenv("IMVEC_OFFLINE", "1")
    images = np.load(FIXTURES / "mobilenet_v1_025_128" / "inputs.npy")
    expected = np.load(FIXTURES / "mobilenet_v1_025_128" / "expected.npz")["features"]
    assert_close("TF2 module", imvec.load(handle)(images).numpy(), expected)


def test_unusable_tfhub_modules_fall_back_to_the_sources(env, monkeypatch, caplog, tmp_path):
    incomplete = env / tfhub_cache.module_dir_name(URL)
    incomplete.mkdir(parents=True)  # e.g. copied by hand without variables/
    (incomplete / "saved_model.pb").write_bytes(b"")
    assert tfhub_cache.find_module(find_card(HANDLE)) is None
    assert "lacks saved_model.pb or variables/variables.index" in caplog.text
    incomplete.rename(tmp_path / "away")
    wrong = fixture_tensors("mobilenet_v1_025_128", logits=False)  # another network
    tensorflow_hub_download(env, URL, wrong)
    with Origin() as origin:
        monkeypatch.setenv("IMVEC_MIRROR_BASE", origin.base)
        origin.file("/tfhub.dev/" + HANDLE, hub_archive(tmp_path))
        module = imvec.load(HANDLE)
        assert origin.count("/tfhub.dev/" + HANDLE) == 1
    assert "does not convert" in caplog.text and "trying the card's sources" in caplog.text
    assert_close("downloaded instead", module(INPUTS).numpy(), EXPECTED["features"])


def test_offline_error_names_cache_add_and_the_tfhub_cache(env, monkeypatch):
    monkeypatch.setenv("IMVEC_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as info:
        imvec.load(HANDLE)
    assert f"imvec cache add {HANDLE} FILE" in str(info.value) and str(env) in str(info.value)
