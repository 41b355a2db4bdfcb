"""Downloads against servers on 127.0.0.1 that behave as the real mirrors do (302 to a signed
URL with a query string, 403 for a Kaggle version that does not exist, zip bundles) and as
broken ones do (stall, drip, a file changed between requests, a redirect loop): nothing
hangs, nothing is spliced, each failure moves on to the next mirror, and the final error
names every source with its reason and how to import weights by hand."""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
import zipfile

import pytest
from local_origin import Origin
from module_builders import fixture_tensors, shrink_card, slim_tarball, write_tf1_hub_module

from imvec.cli import main
from imvec.registry import CARDS, find_card
from imvec.weights import sources, store
from imvec.weights.convert import read_metadata

HANDLE = "google/imagenet/nasnet_mobile/feature_vector/3"
TFHUB = "/tfhub.dev/" + HANDLE
KAGGLE = "/www.kaggle.com/api/v1/models/google/nasnet/tensorFlow1/mobile-feature-vector/{}/download"
SLIM = "/storage.googleapis.com/download.tensorflow.org/models/nasnet-a_mobile_04_10_2017.tar.gz"
TF2 = "/tfhub.dev/google/imagenet/nasnet_mobile/feature_vector/5"
SIGNED = "/storage.googleapis.com/kaggle-models-data/123/456/bundle/archive.{}"
QUERY = "?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Expires=259199&X-Goog-Signature=0a1b"
# small bounds: a stalled or dripping source costs well under a second here
FAST = store.Limits(stall_s=0.3, source_s=0.8, total_s=10.0, min_rate=20_000, window_s=0.3,
                    retries=1)
DATA = os.urandom(200_000)
NEW = os.urandom(200_000)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("IMVEC_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    monkeypatch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "tfhub"))
    for name in ("IMVEC_OFFLINE", "IMVEC_MIRROR_BASE", *store._ENV_LIMITS.values()):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "home"


@pytest.fixture
def origin(monkeypatch):
    shrink_card(monkeypatch)
    with Origin() as o:
        monkeypatch.setenv("IMVEC_MIRROR_BASE", o.base)
        yield o


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory):
    return write_tf1_hub_module(tmp_path_factory.mktemp("hub") / "module", fixture_tensors(
        logits=False))


def bundle(module_dir, path, kind: str) -> bytes:
    """The module as Kaggle's bundle: files at the archive's root, tar.gz or zip."""
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as zf:
            for file in sorted(module_dir.rglob("*")):
                zf.write(file, file.relative_to(module_dir).as_posix())
    else:
        import tarfile

        with tarfile.open(path, "w:gz") as tar:
            for file in sorted(module_dir.iterdir()):
                tar.add(file, arcname=file.name)
    return path.read_bytes()


def serve_kaggle(origin, module_dir, tmp_path, version: int, kind: str = "tar.gz") -> None:
    """Kaggle's API: 302 to a signed GCS URL (with a query string) serving the bundle."""
    signed = SIGNED.format(kind)
    origin.file(signed, bundle(module_dir, tmp_path / f"archive.{kind}", kind))
    origin.redirect(KAGGLE.format(version), signed + QUERY)


def converted_source(card) -> str:
    return read_metadata(sources.weights_path(card))["source"]


# -- the mirrors as they are -----------------------------------------------------------------
def test_registry_mirrors_follow_the_evidence():
    for short in ("nasnet_mobile", "mobilenet_v1_050_160"):
        for variant in ("feature_vector", "classification"):
            card = find_card(short, variant)
            urls = [m.url for m in card.mirrors]
            assert urls[0] == f"https://tfhub.dev/{card.handle}?tf-hub-format=compressed"
            kaggle = [u for u in urls if "kaggle.com" in u]
            assert [u.split("/")[-2] for u in kaggle] == ["2", "1"]  # never 3: no such version
            assert all("/tensorFlow1/" in u for u in kaggle)
    slim = [m for m in find_card("mobilenet_v1_050_160").mirrors if m.kind == "slim_tarball"]
    assert slim[0].sha256 == "fb01b76ca1fb053e5f98d297e21c6c53d0d9f6a8b02ad2e88ac22b33b2adf729"
    assert "2018_08_02" in slim[1].url and slim[1].size == 29_958_343
    for card in CARDS:
        assert all(m.confidence in ("CONFIRMED", "LIKELY", "UNKNOWN") for m in card.mirrors)
        hub = {m.values for m in card.mirrors if m.kind == "hub_tf1"}
        assert hub == ({"ema"} if card.network == "amoebanet_a" else {"raw"})


def test_kaggle_version_2_missing_falls_to_1_and_a_zip_bundle_converts(origin, module_dir,
                                                                       tmp_path):
    origin.status(TFHUB, 404)
    origin.status(KAGGLE.format(2), 403)  # what Kaggle answers for a version it lacks
    serve_kaggle(origin, module_dir, tmp_path, 1, "zip")
    card = find_card(HANDLE)
    sources.ensure_weights(card, limits=FAST)
    assert converted_source(card).endswith("/mobile-feature-vector/1/download")
    agents = {h["User-Agent"] for h in origin.headers_of(TFHUB)}
    assert len(agents) == 1 and agents.pop().startswith("imvec/")  # not urllib's default


def test_kaggle_403_says_it_may_mean_no_such_version(origin):
    origin.status(KAGGLE.format(9), 403)
    url = "https://www.kaggle.com" + KAGGLE.format(9).removeprefix("/www.kaggle.com")
    with pytest.raises(store.DownloadError, match="403.*a model version that does not exist"):
        store.fetch(url, backoff=0)


def test_a_module_kagglehub_downloaded_is_used_without_network(origin, module_dir, tmp_path):
    folder = tmp_path / "kagglehub/models/google/nasnet/tensorflow1/mobile-feature-vector"
    (folder / "2").parent.mkdir(parents=True)
    os.symlink(module_dir, folder / "2")
    card = find_card(HANDLE)
    with pytest.raises(store.DownloadError):  # no completion marker: an unfinished download
        sources.ensure_weights(card, limits=FAST)
    requests = len(origin.requests)
    (folder / "2.complete").touch()
    sources.ensure_weights(card, limits=FAST)
    assert len(origin.requests) == requests
    assert "(kagglehub cache: " in converted_source(card)


# -- no hangs ----------------------------------------------------------------------------------
def test_a_stalled_source_is_left_for_the_next(origin, module_dir, tmp_path, caplog):
    origin.stall(TFHUB, 5.0)  # accepts, never answers
    serve_kaggle(origin, module_dir, tmp_path, 2)
    with caplog.at_level(logging.WARNING, logger="imvec"):
        sources.ensure_weights(find_card(HANDLE), limits=FAST)
    assert "stalled" in caplog.text and origin.count(TFHUB) >= 1
    assert "/mobile-feature-vector/2/download" in converted_source(find_card(HANDLE))


def test_a_dripping_source_is_cut_at_the_minimum_rate(origin, module_dir, tmp_path, caplog):
    origin.drip(TFHUB, b"x" * 10_000_000, seconds_per_byte=0.005)  # ~200 B/s toward 10 MB
    serve_kaggle(origin, module_dir, tmp_path, 2)
    with caplog.at_level(logging.WARNING, logger="imvec"):
        sources.ensure_weights(find_card(HANDLE), limits=FAST)
    assert "too slow" in caplog.text and "under the minimum of 20000 bytes/s" in caplog.text
    assert "/mobile-feature-vector/2/download" in converted_source(find_card(HANDLE))


def test_when_nothing_works_one_message_names_every_source(origin, monkeypatch, capsys):
    for path in (TFHUB, KAGGLE.format(2), KAGGLE.format(1), SLIM, TF2):
        origin.stall(path, 5.0)
    monkeypatch.setenv("IMVEC_DOWNLOAD_STALL_S", "0.2")  # the env vars a user would set
    monkeypatch.setenv("IMVEC_DOWNLOAD_SOURCE_S", "0.5")
    monkeypatch.setenv("IMVEC_DOWNLOAD_TOTAL_S", "1.2")
    assert main(["download", HANDLE]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"imvec download: error: no source of {HANDLE}")
    for mirror in find_card(HANDLE).mirrors:
        assert mirror.url in err
    assert "stalled" in err and "not tried, the time limit of 1 s" in err
    assert f"imvec cache add {HANDLE} FILE" in err and "curl -L" in err


def test_limits_from_the_environment_are_checked(monkeypatch):
    monkeypatch.setenv("IMVEC_DOWNLOAD_STALL_S", "soon")
    with pytest.raises(ValueError, match="IMVEC_DOWNLOAD_STALL_S='soon' is not a number"):
        store.Limits.from_env()
    monkeypatch.setenv("IMVEC_DOWNLOAD_STALL_S", "0")
    with pytest.raises(ValueError, match="must be positive"):
        store.Limits.from_env()


def test_a_redirect_loop_is_named(origin):
    origin.redirect("/a", "/b")
    url = origin.redirect("/b", "/a")
    with pytest.raises(store.DownloadError, match="redirect loop"):
        store.fetch(url, backoff=0)


def test_progress_bar_only_on_a_terminal_or_when_asked(origin, capsys):
    store.fetch(origin.file("/quiet.tar.gz", DATA))  # stderr is not a terminal here
    assert capsys.readouterr().err == ""


# -- no splices --------------------------------------------------------------------------------
@pytest.mark.parametrize("honour_if_range", [True, False], ids=["if-range", "ignores-if-range"])
def test_a_file_changed_between_requests_is_fetched_whole_never_spliced(origin,
                                                                        honour_if_range):
    url = origin.file("/w.tar.gz", DATA, drop_after=80_000, drops=1, then=NEW,
                      honour_if_range=honour_if_range)
    path = store.fetch(url, sha256=hashlib.sha256(NEW).hexdigest(), backoff=0)
    assert path.read_bytes() == NEW
    first, second = origin.headers_of("/w.tar.gz")[:2]
    assert "Range" not in first
    assert second["Range"] == "bytes=80000-"
    assert second["If-Range"] == f'"{hashlib.md5(DATA).hexdigest()}"'  # the old file's ETag


# -- download --check ----------------------------------------------------------------------------
def test_check_probes_with_a_ranged_get_and_fails_when_nothing_answers(origin, module_dir,
                                                                      tmp_path, capsys):
    for path in (TFHUB, KAGGLE.format(2), KAGGLE.format(1), SLIM, TF2):
        origin.status(path, 403)
    assert main(["download", HANDLE, "--check"]) == 1
    captured = capsys.readouterr()
    assert "a model version that does not exist" in captured.out
    assert f"no source of {HANDLE} is reachable" in captured.err
    serve_kaggle(origin, module_dir, tmp_path, 1)
    assert main(["download", HANDLE, "--check"]) == 0
    assert "HTTP 206" in capsys.readouterr().out
    assert origin.count(SIGNED.format("tar.gz"), "HEAD") == 0
    assert origin.headers_of(SIGNED.format("tar.gz"))[0]["Range"] == "bytes=0-0"


# -- raw by default, EMA on request --------------------------------------------------------------
def test_ema_comes_only_from_sources_that_hold_averages(origin, module_dir, tmp_path):
    origin.file(TFHUB, bundle(module_dir, tmp_path / "hub.tar.gz", "tar.gz"))
    archive, _ = slim_tarball(tmp_path, num_shards=1)
    origin.file(SLIM, archive.read_bytes())
    card = find_card(HANDLE)
    averaged = sources.ensure_weights(card, prefer_ema=True, limits=FAST)
    assert averaged.name.endswith("--ema.safetensors") and origin.count(TFHUB) == 0
    meta = read_metadata(averaged)
    assert meta["weights_values"] == "ema" and meta["source"].endswith(SLIM.rsplit("/", 1)[1])
    raw = sources.ensure_weights(card, limits=FAST)  # the default: raw values, from the
    assert raw != averaged  # tarball already downloaded (cached sources come first)
    assert read_metadata(raw)["weights_values"] == "raw" and origin.count(SLIM) == 1


def test_a_transfer_at_the_minimum_rate_outlives_the_deadlines(origin):
    url = origin.file("/big.tar.gz", DATA, chunk_delay=0.15)  # ~0.5 s, at ~400 KB/s
    limits = store.Limits(stall_s=1.0, source_s=0.2, total_s=0.2, min_rate=1000, window_s=0.1)
    path = store.fetch(url, clock=store.Clock.start(limits))
    assert path.read_bytes() == DATA


def test_a_server_that_drops_at_the_same_byte_without_ranges_is_given_up(origin):
    url = origin.file("/loop.tar.gz", DATA, drop_after=50_000, drops=1000, honour_range=False)
    with pytest.raises(store.DownloadError, match="2 failed attempt.*connection closed"):
        store.fetch(url, backoff=0, clock=store.Clock.start(FAST))
    assert origin.count("/loop.tar.gz") == 3  # the first attempt made progress


def test_a_name_lookup_that_never_answers_is_bounded_like_a_stall(origin, monkeypatch):
    """A dead DNS server: getaddrinfo blocks (here until the test ends); urllib's timeout
    does not cover it, so without the lookup deadline this download waited for the resolver."""
    released = threading.Event()
    real = socket.getaddrinfo

    def dead_dns(host, *args, **kwargs):
        if host == "dns-never-answers.test":
            released.wait(60)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", dead_dns)
    monkeypatch.delenv("IMVEC_MIRROR_BASE")
    started = time.monotonic()
    try:
        with pytest.raises(store.DownloadError, match="name lookup of dns-never-answers.test"):
            store.fetch("http://dns-never-answers.test/weights.tar.gz", backoff=0,
                        clock=store.Clock.start(FAST))
        assert time.monotonic() - started < FAST.source_s + 2 * FAST.stall_s + 1
        store.fetch(origin.file("/after.tar.gz", DATA))  # real names still resolve
    finally:
        released.set()
