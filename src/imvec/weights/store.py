"""The local cache: downloads that resume, verify, never half-exist, and happen once.

Layout under ``$IMVEC_HOME`` (default ``~/.cache/imvec``)::

    downloads/<key>-<name>        raw files as fetched, named by their URL (sha256 of it)
    downloads/<key>-<name>.json   what was fetched: url, final url, size, sha256, time
    weights/*.safetensors         converted weights (see ``imvec.weights.sources``)
    tmp/                          archives being unpacked; removed when done

A download goes to ``<file>.part`` under a file lock, resumes with HTTP Range after a dropped
connection, is checked (size, sha256) and only then renamed into place, so a reader never
sees a partial file and concurrent processes fetch it once. ``IMVEC_OFFLINE=1`` never opens a
connection: a missing file is an error that names the URL to fetch by hand and the exact path
to put it at. ``IMVEC_MIRROR_BASE`` sends every request to an internal mirror laid out as
``<base>/<host>/<path>`` (air-gapped sites; the cache keys stay the official URLs).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from imvec._paths import home
from imvec.errors import ChecksumError, ImvecError

__all__ = [
    "CacheEntry",
    "DownloadError",
    "OfflineError",
    "Record",
    "cache_entries",
    "check_url",
    "clear_cache",
    "download_path",
    "downloads_dir",
    "fetch",
    "head",
    "home",
    "is_offline",
    "mirror_url",
    "read_record",
    "sha256_file",
    "tmp_dir",
    "weights_dir",
]

ENV_HOME, ENV_OFFLINE, ENV_MIRROR_BASE = "IMVEC_HOME", "IMVEC_OFFLINE", "IMVEC_MIRROR_BASE"
USER_AGENT = "imvec (+https://github.com/imvec)"
CHUNK = 1 << 20
LOCK_TIMEOUT_S = 6 * 3600  # a lock holder that died releases it at once (OS-level lock)


class DownloadError(ImvecError, OSError):
    """A URL that could not be fetched, after retrying what is worth retrying."""

    def __init__(self, message: str, url: str, status: int | None = None):
        super().__init__(message)
        self.url, self.status = url, status


class OfflineError(ImvecError, FileNotFoundError):
    """``IMVEC_OFFLINE=1`` and the file is not in the cache."""


def downloads_dir() -> Path:
    return home() / "downloads"


def weights_dir() -> Path:
    return home() / "weights"


def tmp_dir() -> Path:
    return home() / "tmp"


def is_offline() -> bool:
    return os.environ.get(ENV_OFFLINE, "").strip().lower() in ("1", "true", "yes", "on")


def check_url(url: str) -> None:
    """Only http(s): no file://, ftp:// or custom schemes reach urllib."""
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"only http:// and https:// URLs are fetched, got {url!r}")


def mirror_url(url: str) -> str:
    """Where ``url`` is fetched from: itself, or ``$IMVEC_MIRROR_BASE/<host>/<path>?<query>``."""
    base = os.environ.get(ENV_MIRROR_BASE, "").strip()
    if not base or url.startswith(base.rstrip("/") + "/"):
        return url
    check_url(base)
    parts = urllib.parse.urlsplit(url)
    rewritten = f"{base.rstrip('/')}/{parts.netloc}{parts.path}"
    return rewritten + (f"?{parts.query}" if parts.query else "")


def download_path(url: str) -> Path:
    """The cache path of ``url``: a hash of the URL plus a readable tail of its path."""
    parts = urllib.parse.urlsplit(url)
    tail = "-".join(p for p in parts.path.split("/") if p)[-80:] or parts.netloc
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", tail).lstrip(".") or "download"
    return downloads_dir() / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{tail}"


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Record:
    """What a cached download is: written beside it, read by ``imvec cache list``."""

    url: str
    final_url: str
    size: int
    sha256: str
    fetched_at: str


def _record_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def read_record(path: Path) -> Record | None:
    try:
        return Record(**json.loads(_record_path(path).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write_record(path: Path, record: Record) -> None:
    target = _record_path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(record), indent=1) + "\n")
    os.replace(tmp, target)


def _verify(path: Path, url: str, sha256: str | None, size: int | None) -> str:
    """sha256 of ``path``, checked against the pinned values; a mismatch deletes the file."""
    actual_size = path.stat().st_size
    digest = None if size is not None and actual_size != size else sha256_file(path)
    if digest is None or (sha256 and digest != sha256.lower()):
        path.unlink(missing_ok=True)
        got = (f"{actual_size} bytes where {size} are pinned" if digest is None else
               f"sha256 {digest}, but {sha256.lower()} is pinned")
        raise ChecksumError(f"{url} gave a file with {got}; the file was deleted. Try again "
                            "(the next mirror is tried automatically); if it persists the "
                            "source changed, so report it rather than unpinning the checksum")
    return digest


def _offline_error(url: str, path: Path) -> OfflineError:
    return OfflineError(f"{ENV_OFFLINE}=1 and {url} is not in the cache. Fetch it by hand on a "
                        f"machine with internet (e.g. `curl -L -o FILE '{url}'`) and put it at "
                        f"{path} (imvec checks its sha256 where one is pinned), or unset "
                        f"{ENV_OFFLINE}")


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects for GET and HEAD alike (urllib before 3.12 turns a redirected HEAD
    into a GET, which would download the file), but only to http(s)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise DownloadError(f"{req.full_url} redirects to {newurl!r}, which is not http(s)",
                                req.full_url, code)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and req.get_method() == "HEAD":
            new.method = "HEAD"
        return new


_OPENER = urllib.request.build_opener(_Redirects)
_RETRIABLE = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError,
              socket.timeout)


def _request(url: str, method: str = "GET", offset: int = 0) -> urllib.request.Request:
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    return urllib.request.Request(url, headers=headers, method=method)


@dataclass(frozen=True)
class Head:
    url: str
    final_url: str
    status: int
    size: int | None


def head(url: str, timeout: float = 30.0) -> Head:
    """A HEAD request (redirects followed): whether a mirror answers, and the size it serves."""
    check_url(url)
    if is_offline():
        raise OfflineError(f"{ENV_OFFLINE}=1: not checking {url}")
    try:
        with _OPENER.open(_request(mirror_url(url), "HEAD"), timeout=timeout) as resp:
            length = resp.headers.get("Content-Length")
            return Head(url, resp.geturl(), resp.status, int(length) if length else None)
    except urllib.error.HTTPError as e:
        return Head(url, e.geturl() or url, e.code, None)
    except _RETRIABLE as e:
        raise DownloadError(f"could not reach {url}: {e}", url) from e


def _content_range_start(value: str | None) -> int | None:
    match = re.match(r"bytes (\d+)-", value or "")
    return int(match.group(1)) if match else None


def _progress_bar(name: str, total: int | None, initial: int, progress: bool | None):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=name, file=sys.stderr, leave=False, disable=None if progress is None
                else not progress, dynamic_ncols=True)


def _attempt(url: str, part: Path, timeout: float, progress: bool | None) -> tuple[str, int]:
    """One request, appending to ``part`` from where it stops; (final URL, bytes received).

    Raises ``_Incomplete`` when the body ends short of its announced length.
    """
    offset = part.stat().st_size if part.exists() else 0
    with _OPENER.open(_request(url, offset=offset), timeout=timeout) as resp:
        if resp.status == 206 and _content_range_start(
                resp.headers.get("Content-Range")) != offset:
            part.unlink(missing_ok=True)
            raise _Incomplete(0, "the server resumed at another offset than asked")
        if resp.status != 206:
            offset = 0  # the server sent the whole file: start over
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        received = 0
        with open(part, "r+b" if offset else "wb") as f, \
                _progress_bar(part.name.removesuffix(".part"), total, offset, progress) as bar:
            f.seek(offset)
            f.truncate()
            try:
                while chunk := resp.read(CHUNK):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except _RETRIABLE as e:
                raise _Incomplete(received, str(e) or type(e).__name__) from e
        if total is not None and offset + received < total:
            raise _Incomplete(received, f"connection closed after {offset + received} of "
                                        f"{total} bytes")
        return resp.geturl(), received


class _Incomplete(Exception):
    def __init__(self, received: int, reason: str):
        super().__init__(reason)
        self.received = received


def _download(url: str, fetch_from: str, part: Path, timeout: float, retries: int,
              backoff: float, progress: bool | None) -> str:
    """Fetch into ``part``, resuming and retrying; returns the final URL after redirects.

    Attempts that received bytes do not count against ``retries`` (a slow, flaky link still
    finishes); attempts that got nothing back off exponentially. Client errors (403, 404)
    are final for this URL, so the caller can move on to the next mirror.
    """
    failures, attempts, last = 0, 0, ""
    where = url if fetch_from == url else f"{url} (via {fetch_from})"
    while attempts < 1000:
        attempts, received = attempts + 1, 0
        try:
            return _attempt(fetch_from, part, timeout, progress)[0]
        except urllib.error.HTTPError as e:
            if e.code == 416:  # our offset is past the end: a stale part file
                part.unlink(missing_ok=True)
                last = "HTTP 416 (stale partial download removed)"
            elif e.code in (408, 425, 429) or e.code >= 500:
                last = f"HTTP {e.code} {e.reason}"
            elif 300 <= e.code < 400:  # urllib refused the redirect (e.g. to file://)
                raise DownloadError(f"{where} redirects to a URL that is not http(s): {e.reason}",
                                    url, e.code) from e
            else:
                raise DownloadError(f"{where} answered HTTP {e.code} {e.reason}", url,
                                    e.code) from e
        except _Incomplete as e:
            received, last = e.received, str(e)
        except _RETRIABLE as e:
            reason = getattr(e, "reason", e)
            last = str(reason) or type(e).__name__
            if isinstance(reason, socket.gaierror):  # no such host, or no DNS at all
                raise DownloadError(f"cannot resolve the host of {where} ({last})", url) from e
        if received == 0:
            failures += 1
            if failures > retries:
                break
            time.sleep(min(backoff * 2 ** (failures - 1), 30.0))
    kept = (f". The partial file {part} is kept and resumed next time"
            if part.is_file() and part.stat().st_size else "")
    raise DownloadError(f"could not download {where} after {failures} failed attempt(s); last "
                        f"error: {last}{kept}", url)


def fetch(
    url: str,
    *,
    sha256: str | None = None,
    size: int | None = None,
    timeout: float = 60.0,
    retries: int = 4,
    backoff: float = 1.0,
    progress: bool | None = None,
) -> Path:
    """The cached copy of ``url``, downloaded once (resumed, verified, atomically renamed).

    ``sha256``/``size`` are checked when pinned; the sha256 is recorded either way.
    ``progress``: a bar on stderr (None: only when stderr is a terminal).
    """
    check_url(url)
    path = download_path(url)
    if path.is_file():
        return _checked(path, url, sha256, size)
    if is_offline():
        raise _offline_error(url, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S):
            if path.is_file():  # another process finished it while we waited
                return _checked(path, url, sha256, size)
            part = path.with_name(path.name + ".part")
            final = _download(url, mirror_url(url), part, timeout, retries, backoff, progress)
            digest = _verify(part, url, sha256, size)
            _write_record(path, Record(url, final, part.stat().st_size, digest,
                                       time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
            os.replace(part, path)
    except Timeout as e:
        raise DownloadError(f"another process has been downloading {url} into {path} for over "
                            f"{LOCK_TIMEOUT_S} s; remove {path}.lock if it is stuck", url) from e
    return path


def _checked(path: Path, url: str, sha256: str | None, size: int | None) -> Path:
    """A cached file, verified against the pins unless its record already vouches for it."""
    record = read_record(path)
    stat = path.stat()
    trusted = (record is not None and record.size == stat.st_size
               and (sha256 is None or record.sha256 == sha256.lower())
               and (size is None or size == stat.st_size))
    if not trusted:  # e.g. a file put there by hand: check it and record it
        digest = _verify(path, url, sha256, size)
        _write_record(path, Record(url, "(placed by hand)" if record is None else
                                   record.final_url, stat.st_size, digest,
                                   time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
    return path


@dataclass(frozen=True)
class CacheEntry:
    kind: str  # "download", "partial" or "weights"
    path: Path
    size: int
    detail: str  # URL (downloads) or source (weights)


def cache_entries() -> Iterator[CacheEntry]:
    """Everything the cache holds, for ``imvec cache list``."""
    for path in sorted(downloads_dir().glob("*")) if downloads_dir().is_dir() else []:
        if path.suffix in (".json", ".lock") or not path.is_file():
            continue
        if path.name.endswith(".part"):
            yield CacheEntry("partial", path, path.stat().st_size, "(interrupted download)")
            continue
        record = read_record(path)
        yield CacheEntry("download", path, path.stat().st_size,
                         f"{record.url} sha256 {record.sha256}" if record else "(no record)")
    for path in sorted(weights_dir().glob("*.safetensors")) if weights_dir().is_dir() else []:
        yield CacheEntry("weights", path, path.stat().st_size, _weights_source(path))


def _weights_source(path: Path) -> str:
    from imvec.weights.convert import read_metadata

    try:
        meta = read_metadata(path)
    except ImvecError as e:
        return f"(unreadable: {e})"
    sha = f", sha256 {meta['source_sha256']}" if meta.get("source_sha256") else ""
    return f"{meta.get('arch')} from {meta.get('source')}{sha}"


def clear_cache(parts: tuple[str, ...] = ("downloads", "weights", "tmp")) -> int:
    """Delete those parts of the cache (never anything else under ``$IMVEC_HOME``); bytes freed."""
    freed = 0
    for part in parts:
        if part not in ("downloads", "weights", "tmp"):
            raise ValueError(f"unknown cache part {part!r}; use downloads, weights or tmp")
        root = home() / part
        if not root.is_dir():
            continue
        freed += sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        shutil.rmtree(root)
    return freed
