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

from imvec._io import atomic_write_text
from imvec._paths import home
from imvec.errors import ChecksumError, ImvecError
from imvec.weights.lookup import LookupTimeout, handlers

__all__ = [
    "CacheEntry",
    "Clock",
    "DownloadError",
    "Limits",
    "OfflineError",
    "Probe",
    "Record",
    "cache_entries",
    "check_url",
    "clear_cache",
    "download_path",
    "downloads_dir",
    "fetch",
    "home",
    "is_offline",
    "mirror_url",
    "probe",
    "read_record",
    "sha256_file",
    "tmp_dir",
    "weights_dir",
]

ENV_OFFLINE, ENV_MIRROR_BASE = "IMVEC_OFFLINE", "IMVEC_MIRROR_BASE"
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
    atomic_write_text(_record_path(path), json.dumps(asdict(record), indent=1) + "\n")


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
    """Follow redirects only to http(s), and name a loop as one (urllib's default message
    speaks of an "infinite loop" inside a generic HTTP error)."""

    inf_msg = "redirect loop (the same URL again, or more than 10 redirects); last answer: "

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise DownloadError(f"{req.full_url} redirects to {newurl!r}, which is not http(s)",
                                req.full_url, code)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_Redirects, *handlers())
_RETRIABLE = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError,
              socket.timeout)
_ENV_LIMITS = {"stall_s": "IMVEC_DOWNLOAD_STALL_S", "source_s": "IMVEC_DOWNLOAD_SOURCE_S",
               "total_s": "IMVEC_DOWNLOAD_TOTAL_S", "min_rate": "IMVEC_DOWNLOAD_MIN_RATE"}


@dataclass(frozen=True)
class Limits:
    """How long a download may go on without real progress (each also set by its env var).

    ``stall_s``: an attempt that receives no byte for this long fails. ``source_s``: a source
    is dropped once this much time has passed and it is not transferring at ``min_rate``
    bytes/s (averaged over the last ``window_s``); ``total_s``: the same bound for all of a
    handle's sources together. A transfer at or above ``min_rate`` is never cut, however
    long the file. ``retries``: attempts per source that may receive nothing.
    """

    stall_s: float = 20.0
    source_s: float = 45.0
    total_s: float = 120.0
    min_rate: float = 8192.0
    window_s: float = 20.0
    retries: int = 2

    @classmethod
    def from_env(cls) -> Limits:
        values = {}
        for name, env in _ENV_LIMITS.items():
            text = os.environ.get(env, "").strip()
            if text:
                try:
                    values[name] = float(text)
                except ValueError:
                    raise ValueError(f"{env}={text!r} is not a number; set it to seconds "
                                     "(bytes/s for the rate) or unset it") from None
                if not values[name] > 0:
                    raise ValueError(f"{env}={text!r} must be positive; unset it for the "
                                     "default")
        return cls(**values)


@dataclass
class Clock:
    """The deadlines of one source and of the whole attempt (``time.monotonic`` values)."""

    limits: Limits
    total_deadline: float
    source_deadline: float = 0.0

    @classmethod
    def start(cls, limits: Limits | None = None) -> Clock:
        limits = limits or Limits.from_env()
        return cls(limits, time.monotonic() + limits.total_s)

    def next_source(self) -> Clock:
        self.source_deadline = time.monotonic() + self.limits.source_s
        return self

    @property
    def deadline(self) -> float:
        return min(self.source_deadline or self.total_deadline, self.total_deadline)

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    def total_expired(self) -> bool:
        return time.monotonic() >= self.total_deadline

    def extend(self, until: float) -> None:
        """A transfer at the minimum rate moves the deadlines (so a dropped connection still
        has time to resume)."""
        self.source_deadline = max(self.source_deadline, until)
        self.total_deadline = max(self.total_deadline, until)

    def socket_timeout(self) -> float:
        """The stall bound, shortened so that an attempt ends near the deadline."""
        return max(0.2, min(self.limits.stall_s, self.deadline - time.monotonic()))


def _user_agent() -> str:
    """imvec's own (urllib's default one draws 403s from tfhub.dev: tensorflow/hub#922)."""
    from imvec._version import __version__

    return f"imvec/{__version__} (+https://github.com/imvec)"


def _request(url: str, method: str = "GET", headers: dict[str, str] | None = None
             ) -> urllib.request.Request:
    base = {"User-Agent": _user_agent(), "Accept-Encoding": "identity"}
    return urllib.request.Request(url, headers={**base, **(headers or {})}, method=method)


@dataclass(frozen=True)
class Probe:
    """What a source answered to a one-byte ranged GET (``imvec download --check``)."""

    url: str
    final_url: str
    status: int | None
    size: int | None
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status in (200, 206)


def probe(url: str, timeout: float = 15.0) -> Probe:
    """Ask ``url`` for its first byte (GET with ``Range: bytes=0-0``, redirects followed).

    Not HEAD: the signed storage URLs that tfhub.dev and Kaggle redirect to are signed for
    GET, so a HEAD can be refused where the download works.
    """
    check_url(url)
    if is_offline():
        raise OfflineError(f"{ENV_OFFLINE}=1: not checking {url}")
    try:
        with _OPENER.open(_request(mirror_url(url), headers={"Range": "bytes=0-0"}),
                          timeout=timeout) as resp:
            total = _content_range_total(resp.headers.get("Content-Range"))
            length = resp.headers.get("Content-Length")
            size = total if resp.status == 206 else (int(length) if length else None)
            return Probe(url, resp.geturl(), resp.status, size)
    except urllib.error.HTTPError as e:
        return Probe(url, e.geturl() or url, e.code, None, _http_reason(url, e))
    except DownloadError as e:
        return Probe(url, url, None, None, str(e))
    except _RETRIABLE as e:
        return Probe(url, url, None, None, f"unreachable ({getattr(e, 'reason', e) or e!r})")


def _http_reason(url: str, error: urllib.error.HTTPError) -> str:
    text = f"HTTP {error.code} {error.reason}"
    if str(error.reason).startswith("redirect loop"):
        return str(error.reason)
    if error.code == 403 and urllib.parse.urlsplit(url).netloc.endswith("kaggle.com"):
        text += (" (Kaggle also answers 403 for a model version that does not exist, not only "
                 "for a denied one)")
    return text


def _content_range_start(value: str | None) -> int | None:
    match = re.match(r"bytes (\d+)-", value or "")
    return int(match.group(1)) if match else None


def _content_range_total(value: str | None) -> int | None:
    match = re.match(r"bytes [^/]*/(\d+)$", (value or "").strip())
    return int(match.group(1)) if match else None


def _progress_bar(name: str, total: int | None, initial: int, progress: bool | None):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024,
                desc=name, file=sys.stderr, leave=False, disable=None if progress is None
                else not progress, dynamic_ncols=True)


class _Incomplete(Exception):
    def __init__(self, received: int, reason: str, final: bool = False):
        super().__init__(reason)
        self.received, self.final = received, final


def _validators_path(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _saved_validators(part: Path) -> dict:
    """ETag / Last-Modified / total size of the file a partial download came from."""
    try:
        saved = json.loads(_validators_path(part).read_text())
        return saved if isinstance(saved, dict) else {}
    except (OSError, ValueError):
        return {}


def _if_range(saved: dict) -> str | None:
    """A validator If-Range accepts: a strong ETag, else Last-Modified (RFC 9110 13.1.5)."""
    etag = saved.get("etag") or ""
    if etag and not etag.startswith("W/"):
        return etag
    return saved.get("last_modified") or None


def _start_over(part: Path) -> None:
    part.unlink(missing_ok=True)
    _validators_path(part).unlink(missing_ok=True)


class _Transfer:
    """Counts received bytes; refuses a transfer that stays under the minimum rate after the
    deadline (a server dripping bytes must not hold a download forever)."""

    def __init__(self, clock: Clock):
        self.clock, self.started = clock, time.monotonic()
        self.samples: list[tuple[float, int]] = [(self.started, 0)]
        self.received = 0

    def add(self, n: int) -> None:
        now = time.monotonic()
        self.received += n
        self.samples.append((now, self.received))
        window = self.clock.limits.window_s
        while len(self.samples) > 2 and self.samples[1][0] <= now - window:
            self.samples.pop(0)
        if now - self.started < window:
            return
        t0, b0 = self.samples[0]
        rate = (self.received - b0) / max(now - t0, 1e-9)
        if rate >= self.clock.limits.min_rate:
            self.clock.extend(now + self.clock.limits.stall_s)
        elif now >= self.clock.deadline:
            raise _Incomplete(self.received, f"too slow: {rate:.0f} bytes/s over the last "
                              f"{now - t0:.1f} s, under the minimum of "
                              f"{self.clock.limits.min_rate:.0f} bytes/s "
                              f"(${_ENV_LIMITS['min_rate']})", final=True)


def _attempt(url: str, part: Path, clock: Clock, progress: bool | None,
             size: int | None) -> str:
    """One request, appending to ``part`` where the same file resumes; the final URL.

    A resume sends ``If-Range`` with the validator seen before: a server whose file changed
    answers 200 with the whole new file, and the part is started over, never spliced.
    Raises ``_Incomplete`` when the body ends short of its announced length.
    """
    saved = _saved_validators(part)
    offset = part.stat().st_size if part.exists() else 0
    validator = _if_range(saved)
    if offset and validator is None:  # nothing proves the part is of today's file
        _start_over(part)
        offset = 0
    headers = {"Range": f"bytes={offset}-", "If-Range": validator} if offset else {}
    timeout = clock.socket_timeout()
    with _OPENER.open(_request(url, headers=headers), timeout=timeout) as resp:
        etag, modified = resp.headers.get("ETag"), resp.headers.get("Last-Modified")
        if resp.status == 206:
            total = _content_range_total(resp.headers.get("Content-Range"))
            changed = (etag and saved.get("etag") and etag != saved["etag"]) or (
                total is not None and saved.get("total") not in (None, total))
            if changed or _content_range_start(resp.headers.get("Content-Range")) != offset:
                _start_over(part)  # the server ignored If-Range or resumed elsewhere
                raise _Incomplete(0, "the file changed on the server since the partial "
                                     "download; starting over")
        else:
            offset = 0  # the whole (possibly changed) file: start over
            length = resp.headers.get("Content-Length")
            total = int(length) if length is not None else None
        if size is not None and total is not None and total != size:
            raise _Incomplete(0, f"the server announces {total} bytes where {size} are "
                                 "pinned: another file", final=True)
        if offset == 0:
            atomic_write_text(_validators_path(part), json.dumps(
                {"url": url, "etag": etag, "last_modified": modified, "total": total}),
                durable=False)
        transfer = _Transfer(clock)
        with open(part, "r+b" if offset else "wb") as f, \
                _progress_bar(part.name.removesuffix(".part"), total, offset, progress) as bar:
            f.seek(offset)
            f.truncate()
            try:
                while chunk := resp.read1(CHUNK):  # read1: returns what arrived (no drip hang)
                    f.write(chunk)
                    bar.update(len(chunk))
                    transfer.add(len(chunk))
            except _RETRIABLE as e:
                reason = f"no data for {timeout:.1f} s (stalled)" if (
                    isinstance(e, (TimeoutError, socket.timeout))) else str(e)
                raise _Incomplete(transfer.received, reason or type(e).__name__) from None
        if total is not None and offset + transfer.received < total:
            raise _Incomplete(transfer.received, f"connection closed after "
                                                 f"{offset + transfer.received} of {total} "
                                                 "bytes")
        return resp.geturl()


def _download(url: str, fetch_from: str, part: Path, clock: Clock, backoff: float,
              progress: bool | None, size: int | None) -> str:
    """Fetch into ``part``, resuming and retrying within the clock's deadlines; the final
    URL after redirects.

    Attempts that grew the partial file do not count against the retries (a slow, flaky link
    still finishes, as long as it keeps the minimum rate); attempts that did not back off
    exponentially. Client errors (403, 404) are final for this URL, so the caller can move
    on to the next mirror.
    """
    failures, last, best = 0, "", 0
    where = url if fetch_from == url else f"{url} (via {fetch_from})"
    while True:
        if clock.expired():
            last = (f"{last}; " if last else "") + "gave up at the time limit"
            break
        received, waited = 0, clock.socket_timeout()
        try:
            return _attempt(fetch_from, part, clock, progress, size)
        except urllib.error.HTTPError as e:
            reason = _http_reason(url, e)
            if e.code == 416:  # our offset is past the end: a stale part file
                _start_over(part)
                last = "HTTP 416 (stale partial download removed)"
            elif e.code in (408, 425, 429) or e.code >= 500:
                last = reason
            elif reason.startswith("redirect loop"):
                raise DownloadError(f"{where}: {reason}", url, e.code) from None
            elif 300 <= e.code < 400:  # urllib refused the redirect (e.g. to file://)
                raise DownloadError(f"{where} redirects to a URL that is not http(s): "
                                    f"{e.reason}", url, e.code) from None
            else:
                raise DownloadError(f"{where} answered {reason}", url, e.code) from None
        except _Incomplete as e:
            received, last = e.received, str(e)
            if e.final:
                raise DownloadError(f"{where}: {last}", url) from None
        except _RETRIABLE as e:
            reason = getattr(e, "reason", e)
            last = str(reason) or type(e).__name__
            if isinstance(reason, LookupTimeout):
                last = f"{reason} (is DNS reachable?)"
            elif isinstance(reason, (TimeoutError, socket.timeout)) or isinstance(
                    e, (TimeoutError, socket.timeout)):
                last = f"no answer for {waited:.1f} s (stalled)"
            if isinstance(reason, socket.gaierror):  # no such host, or no DNS at all
                raise DownloadError(f"cannot resolve the host of {where} ({last})",
                                    url) from None
        size_now = part.stat().st_size if part.exists() else 0
        if received == 0 or size_now <= best:  # no progress (e.g. the same bytes again)
            failures += 1
            if failures > clock.limits.retries:
                break
            if clock.deadline - time.monotonic() < clock.limits.stall_s / 2:
                last += "; too little time left for another attempt"
                break
            time.sleep(min(backoff * 2 ** (failures - 1), 30.0,
                           max(clock.deadline - time.monotonic(), 0)))
        best = max(best, size_now)
    kept = (f". The partial file {part} is kept and resumed next time"
            if part.is_file() and part.stat().st_size else "")
    raise DownloadError(f"could not download {where} after {failures} failed attempt(s); last "
                        f"error: {last}{kept}", url)


def fetch(
    url: str,
    *,
    sha256: str | None = None,
    size: int | None = None,
    backoff: float = 1.0,
    progress: bool | None = None,
    clock: Clock | None = None,
) -> Path:
    """The cached copy of ``url``, downloaded once (resumed, verified, atomically renamed).

    ``sha256``/``size`` are checked when pinned; the sha256 is recorded either way.
    ``progress``: a bar on stderr (None: only when stderr is a terminal). ``clock``: the
    deadlines to keep (default: a fresh one from :class:`Limits` and its env vars).
    """
    check_url(url)
    path = download_path(url)
    if path.is_file():
        return _checked(path, url, sha256, size)
    if is_offline():
        raise _offline_error(url, path)
    clock = clock or Clock.start()
    if not clock.source_deadline:
        clock.next_source()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(path) + ".lock", timeout=LOCK_TIMEOUT_S):
            if path.is_file():  # another process finished it while we waited
                return _checked(path, url, sha256, size)
            part = path.with_name(path.name + ".part")
            final = _download(url, mirror_url(url), part, clock, backoff, progress, size)
            try:
                digest = _verify(part, url, sha256, size)
            finally:
                if not part.exists():  # deleted as corrupt: its validators go with it
                    _start_over(part)
            _write_record(path, Record(url, final, part.stat().st_size, digest,
                                       time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())))
            os.replace(part, path)
            _validators_path(part).unlink(missing_ok=True)
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
