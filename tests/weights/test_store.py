"""The download store against a real HTTP server on 127.0.0.1: resume, retries, redirects,
checksums, locking across processes, offline mode, the cache commands."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from local_origin import Origin

from imvec.cli import main
from imvec.errors import ChecksumError
from imvec.weights import store

DATA = os.urandom(300_000)
SHA = hashlib.sha256(DATA).hexdigest()


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("IMVEC_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("IMVEC_OFFLINE", raising=False)
    monkeypatch.delenv("IMVEC_MIRROR_BASE", raising=False)
    return tmp_path / "home"


@pytest.fixture
def origin():
    with Origin() as o:
        yield o


def test_download_is_verified_recorded_and_cached(origin):
    url = origin.file("/w.tar.gz", DATA)
    path = store.fetch(url, sha256=SHA, size=len(DATA))
    assert path.read_bytes() == DATA and path.parent == store.downloads_dir()
    record = store.read_record(path)
    assert (record.url, record.sha256, record.size) == (url, SHA, len(DATA))
    assert store.fetch(url, sha256=SHA) == path
    assert origin.count("/w.tar.gz") == 1  # the second call never touched the network


def test_sha256_is_recorded_even_when_not_pinned(origin):
    path = store.fetch(origin.file("/w", DATA))
    assert store.read_record(path).sha256 == SHA


def test_dropped_connection_resumes_with_range(origin):
    url = origin.file("/w.tar.gz", DATA, drop_after=100_000, drops=1)
    path = store.fetch(url, sha256=SHA, backoff=0)
    assert path.read_bytes() == DATA
    ranges = [h.get("Range") for h in origin.headers_of("/w.tar.gz")]
    assert ranges == [None, "bytes=100000-"]


def test_server_ignoring_range_restarts_cleanly(origin):
    url = origin.file("/w", DATA, drop_after=50_000, drops=1, honour_range=False)
    assert store.fetch(url, sha256=SHA, backoff=0).read_bytes() == DATA


def leave_partial(url: str, data: bytes, etag: str | None) -> Path:
    """What an interrupted earlier run leaves: the part and the validators it saw."""
    part = store.download_path(url).with_name(store.download_path(url).name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(data)
    if etag:
        part.with_name(part.name + ".json").write_text(json.dumps(
            {"url": url, "etag": etag, "last_modified": None, "total": len(DATA)}))
    return part


def test_partial_file_from_an_earlier_run_is_resumed_if_the_file_is_the_same(origin):
    url = origin.file("/w", DATA)
    part = leave_partial(url, DATA[:123_456], f'"{hashlib.md5(DATA).hexdigest()}"')
    assert store.fetch(url, sha256=SHA).read_bytes() == DATA
    sent = origin.headers_of("/w")[0]
    assert sent["Range"] == "bytes=123456-"
    assert sent["If-Range"] == f'"{hashlib.md5(DATA).hexdigest()}"'
    assert not part.exists() and not part.with_name(part.name + ".json").exists()


def test_partial_file_of_unknown_origin_is_not_spliced(origin):
    url = origin.file("/w", DATA)
    leave_partial(url, b"something else" * 1000, None)  # no record of the file it came from
    assert store.fetch(url, sha256=SHA).read_bytes() == DATA
    assert "Range" not in origin.headers_of("/w")[0]


def test_wrong_checksum_deletes_the_file_and_says_so(origin):
    url = origin.file("/w", DATA)
    with pytest.raises(ChecksumError, match=f"sha256 {SHA}.*deleted"):
        store.fetch(url, sha256="0" * 64)
    assert not any(store.downloads_dir().glob("*-w*")) or all(
        p.suffix == ".lock" for p in store.downloads_dir().glob("*-w*"))


def test_client_error_is_final_server_error_is_retried(origin):
    url = origin.status("/forbidden", 403)
    with pytest.raises(store.DownloadError, match="403") as info:
        store.fetch(url, backoff=0)
    assert info.value.status == 403 and origin.count("/forbidden") == 1
    url = origin.status("/broken", 500)
    with pytest.raises(store.DownloadError, match="3 failed attempt.*HTTP 500"):
        store.fetch(url, backoff=0, clock=store.Clock.start(store.Limits(retries=2)))
    assert origin.count("/broken") == 3


def test_stalls_are_bounded(origin):
    url = origin.stall("/slow", 3.0)
    with pytest.raises(store.DownloadError, match="2 failed attempt.*stalled"):
        store.fetch(url, backoff=0, clock=store.Clock.start(store.Limits(stall_s=0.3,
                                                                          retries=1)))
    assert origin.count("/slow") == 2


def test_redirects_to_signed_urls_are_followed_and_probed_with_a_ranged_get(origin):
    origin.file("/bucket/signed.tar.gz", DATA)
    url = origin.redirect("/google/imagenet/m/feature_vector/3",
                          "/bucket/signed.tar.gz?X-Goog-Signature=abc&X-Goog-Expires=259200")
    answer = store.probe(url + "?tf-hub-format=compressed")
    assert answer.ok and answer.status == 206 and answer.size == len(DATA)
    assert "/bucket/signed.tar.gz?X-Goog-Signature=abc" in answer.final_url
    assert origin.headers_of("/bucket/signed.tar.gz")[0]["Range"] == "bytes=0-0"
    assert origin.count("/bucket/signed.tar.gz", "HEAD") == 0
    path = store.fetch(url + "?tf-hub-format=compressed", sha256=SHA)
    assert store.read_record(path).final_url.endswith("X-Goog-Expires=259200")


def test_only_http_urls_and_redirects(origin):
    with pytest.raises(ValueError, match="only http"):
        store.fetch("file:///etc/passwd")
    with pytest.raises(ValueError, match="only http"):
        store.fetch("ftp://example.com/x.tar.gz")
    for target in ("file:///etc/passwd", "ftp://example.com/x"):
        url = origin.redirect("/evil", target)
        with pytest.raises(store.DownloadError, match="not http"):
            store.fetch(url, backoff=0)


def test_offline_names_the_url_and_where_to_put_it(origin, monkeypatch):
    url = origin.file("/w.tar.gz", DATA)
    monkeypatch.setenv("IMVEC_OFFLINE", "1")
    with pytest.raises(store.OfflineError) as info:
        store.fetch(url, sha256=SHA)
    message = str(info.value)
    target = store.download_path(url)
    assert url in message and str(target) in message
    assert origin.requests == []
    target.parent.mkdir(parents=True)
    target.write_bytes(DATA)  # fetched by hand, as the message says
    assert store.fetch(url, sha256=SHA) == target
    assert store.read_record(target).sha256 == SHA
    target.write_bytes(DATA[:-1] + bytes([DATA[-1] ^ 0xFF]))  # always a different byte
    target.with_name(target.name + ".json").unlink()
    with pytest.raises(ChecksumError):
        store.fetch(url, sha256=SHA)
    assert not target.exists()


def test_mirror_base_redirects_every_request(origin, monkeypatch):
    origin.file("/example.org/models/w.tar.gz", DATA)
    monkeypatch.setenv("IMVEC_MIRROR_BASE", origin.base + "/")
    url = "https://example.org/models/w.tar.gz"
    assert store.mirror_url(url + "?a=b") == origin.base + "/example.org/models/w.tar.gz?a=b"
    path = store.fetch(url, sha256=SHA)
    assert path == store.download_path(url)  # cached under the official URL


FETCH_IN_CHILD = """
import sys
from imvec.weights import store
path = store.fetch(sys.argv[1], sha256=sys.argv[2], progress=False)
print(path)
"""


def test_concurrent_processes_download_once(origin, home):
    url = origin.file("/w.tar.gz", DATA, chunk_delay=0.05)  # ~0.25 s per download
    env = {**os.environ, "IMVEC_HOME": str(home)}
    children = [subprocess.Popen([sys.executable, "-c", FETCH_IN_CHILD, url, SHA], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(4)]
    outputs = [c.communicate(timeout=60) for c in children]
    assert all(c.returncode == 0 for c in children), outputs
    assert len({out.strip() for out, _ in outputs}) == 1
    assert Path(outputs[0][0].strip()).read_bytes() == DATA
    assert origin.count("/w.tar.gz") == 1


def test_cache_list_and_clear(origin, home, capsys):
    store.fetch(origin.file("/w.tar.gz", DATA))
    assert main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "download" in out and SHA in out and str(home) in out
    assert main(["cache", "clear", "--only", "downloads"]) == 0
    assert "0.3 MiB" in capsys.readouterr().out
    assert not store.downloads_dir().exists() and home.exists()


def test_progress_bar_goes_to_stderr(origin, capsys):
    store.fetch(origin.file("/bar.tar.gz", DATA), progress=True)
    captured = capsys.readouterr()
    assert "bar.tar.gz" in captured.err and "293k" in captured.err.lower()
    assert captured.out == ""
