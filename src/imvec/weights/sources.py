"""A SOURCE, whatever its form, turned into TF-named tensors to convert.

A SOURCE is one of:

- a registry handle, short name or ``https://tfhub.dev/...`` URL: a module tensorflow_hub
  or kagglehub already downloaded (``$TFHUB_CACHE_DIR``, ``$KAGGLEHUB_CACHE``) if there is
  one, else the card's mirrors, tried in order (downloads already in the cache first) until
  one downloads, verifies, unpacks and converts, within the time limits of
  :class:`imvec.weights.store.Limits`;
- an http(s) URL: downloaded into the cache (one of a card's mirror URLs also names its
  network; any other URL needs ``arch``);
- a ``.tar.gz`` / ``.tgz`` / ``.tar`` / ``.zip`` archive: unpacked safely into
  ``$IMVEC_HOME/tmp``;
- a directory: a TF1 hub module, a TF2 SavedModel, or a folder holding one TF checkpoint
  (an unpacked TF-Slim tarball);
- a TF checkpoint prefix (``.../model.ckpt``, or the ``.index`` file).

Raw or EMA: a TF-Slim checkpoint holds raw values ``X`` and moving averages
``X/ExponentialMovingAverage``. The raw values are used by default: the published TF-Slim
accuracies were measured with them and the TF-Hub NASNet/MobileNet modules hold them, so every
mirror of a handle gives the same vectors. ``prefer_ema=True`` takes the averages instead (for
a registry handle, only from sources that hold them). AmoebaNet's module holds EMA values
under the plain names (its exporter restored the averages), and there is no other source.
The choice is recorded in the converted file's metadata (``weights_values``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import urllib.parse
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from imvec.errors import ImvecError, UnknownHandleError
from imvec.registry import CARDS, Card, Mirror, find_card
from imvec.weights import store, tfhub_cache
from imvec.weights.archives import ARCHIVE_SUFFIXES, extract, is_archive
from imvec.weights.convert import convert_tensors, sha256_of_files
from imvec.weights.hub_module import open_module, tf2_variable_names
from imvec.weights.tf_checkpoint import CheckpointReader

__all__ = [
    "EMA_SUFFIX",
    "CheckpointTensors",
    "Opened",
    "card_for",
    "convert_source",
    "ensure_source_weights",
    "ensure_weights",
    "identify",
    "is_registry_name",
    "open_source",
    "weights_path",
    "weights_values",
]

EMA_SUFFIX = "/ExponentialMovingAverage"
log = logging.getLogger("imvec")


class CheckpointTensors(Mapping):
    """A TF checkpoint's tensors under the names to convert, each read when accessed.

    ``rename`` maps checkpoint keys to variable names (TF2 object paths); with
    ``prefer_ema``, ``X/ExponentialMovingAverage`` is served as ``X`` (see the module doc).
    ``values`` says which were taken: "raw", "ema", or "as saved" (no twins in the file).
    """

    def __init__(self, reader: CheckpointReader, rename: Mapping[str, str] | None = None,
                 prefer_ema: bool = False):
        self._reader = reader
        keys = {(rename or {}).get(k, k): k for k in reader}
        twins = [n for n in keys if n.endswith(EMA_SUFFIX) and n.removesuffix(EMA_SUFFIX)
                 in keys]
        self.ema_count = len(twins) if prefer_ema else 0
        for name in twins:  # the unused copy goes, so nothing can pick it by mistake
            chosen = keys.pop(name)
            if prefer_ema:
                keys[name.removesuffix(EMA_SUFFIX)] = chosen
        self.values = ("ema" if prefer_ema else "raw") if twins else "as saved"
        self._keys = keys

    def __getitem__(self, name: str) -> np.ndarray:
        return self._reader.read(self._keys[name])

    def shape(self, name: str) -> tuple[int, ...]:
        """Without reading the tensor (what a completeness check needs)."""
        return tuple(self._reader.shape(self._keys[name]))

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._keys))

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._keys


@dataclass
class Opened:
    """Tensors ready to convert, with what they came from (for the file's metadata)."""

    tensors: CheckpointTensors
    card: Card | None  # the network, when the source names it
    source: str
    source_sha256: str
    layout: str  # "checkpoint", "hub_tf1" or "saved_model_tf2"


# -- what a SOURCE string names ------------------------------------------------------------
def _same_url(a: str, b: str) -> bool:
    def norm(u: str) -> str:
        return u.split("://", 1)[-1].rstrip("/")

    return norm(a) == norm(b)


def _mirror_of(url: str) -> tuple[Card, Mirror] | None:
    for card in CARDS:
        for mirror in card.mirrors:
            if _same_url(mirror.url, url):
                return card, mirror
    return None


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _is_url(text: str) -> bool:
    return bool(_SCHEME.match(text))


def _looks_like_path(text: str) -> bool:
    """Not a registry name: absolute, ./ ~ prefixed, a file suffix, or under an existing dir."""
    if os.path.isabs(text) or text.startswith(("./", "../", "~")):
        return True
    if text.endswith((*ARCHIVE_SUFFIXES, ".index", ".safetensors")):
        return True
    head = text.split("/", 1)[0]
    return "/" in text and Path(head).is_dir()


def _exists_locally(text: str) -> bool:
    path = Path(text).expanduser()
    return path.exists() or Path(f"{path}.index").is_file()


def _is_tfhub(url: str) -> bool:
    return urllib.parse.urlsplit(url).netloc.lower().removeprefix("www.") == "tfhub.dev"


def _archive_url(url: str) -> str:
    """tfhub.dev serves a module's tarball only when asked with ``tf-hub-format=compressed``
    (any other handle than the registry's: e.g. an older version, with ``arch``)."""
    if _is_tfhub(url) and "tf-hub-format=" not in url:
        return url + ("&" if "?" in url else "?") + "tf-hub-format=compressed"
    return url


def _registry_key(text: str) -> bool:
    """An exact handle or short name: these name registry weights even if a local file of
    the same name exists (write ``./name`` for the file)."""
    try:
        find_card(text)
    except ValueError:
        return False
    return True


def identify(source: str, variant: str | None = None) -> Card | None:
    """The card a SOURCE names by itself (handle, short name, tfhub.dev URL, a card's mirror
    URL), or None for sources that need ``arch`` (local paths, other URLs)."""
    if _is_url(source):
        store.check_url(source)
        if _is_tfhub(source):
            return find_card(source, variant) if _registry_key(source) else None
        found = _mirror_of(source)
        return find_card(found[0].handle if variant is None else found[0].short_name,
                         variant) if found else None
    if not _registry_key(source) and _exists_locally(source):
        return None
    try:
        return find_card(source, variant)
    except UnknownHandleError as e:
        if _looks_like_path(source):
            raise FileNotFoundError(f"{source} does not exist (SOURCE is a registry handle, "
                                    "an http(s) URL, a .tar.gz archive, a module or checkpoint "
                                    "directory, or a checkpoint prefix)") from e
        raise UnknownHandleError(f"{e}; no file or directory of that name exists either") from e


def is_registry_name(source: str) -> bool:
    """A handle, short name or tfhub.dev URL: weights come from the card's mirrors."""
    if _is_url(source):
        return _is_tfhub(source) and _registry_key(source)
    if _registry_key(source):
        return True
    return not _exists_locally(source) and not _looks_like_path(source)


def card_for(source: str, arch: str | None, variant: str | None = None) -> Card:
    named = identify(source, variant)
    if arch is None:
        if named is None:
            raise ValueError(f"{source} does not say which network it holds; pass arch= (CLI: "
                             "--arch) with one of: " + ", ".join(
                                 sorted({c.short_name for c in CARDS})))
        return named
    card = find_card(arch, variant)
    if named is not None and named.network != card.network:
        raise ValueError(f"{source} is {named.handle} ({named.network}), but arch={arch!r} "
                         f"names {card.network}; drop arch or make them agree")
    return card


# -- opening a source ----------------------------------------------------------------------
def _find_model(root: Path) -> tuple[str, Path]:
    """("module", dir) or ("checkpoint", prefix) for the one model under ``root``."""
    if (root / "saved_model.pb").is_file():
        return "module", root
    found = sorted(p for p in root.rglob("*") if p.name == "saved_model.pb" and
                   len(p.relative_to(root).parts) <= 4)
    if len(found) == 1:
        return "module", found[0].parent
    indexes = sorted(p for p in root.rglob("*.index") if len(p.relative_to(root).parts) <= 4)
    if len(found) > 1 or len(indexes) > 1:
        names = [str(p.relative_to(root)) for p in (found or indexes)]
        raise ImvecError(f"{root} holds several models ({', '.join(names[:6])}); pass the one "
                         "to use (its directory, or the checkpoint prefix)")
    if not indexes:
        raise ImvecError(f"{root} holds no TF checkpoint (no *.index file), hub module or "
                         "SavedModel (no saved_model.pb)")
    return "checkpoint", indexes[0].with_suffix("")


@contextlib.contextmanager
def _open_checkpoint_or_module(kind: str, path: Path, prefer_ema: bool):
    if kind == "module":
        module = open_module(path)
        rename = tf2_variable_names(path) if module.kind == "saved_model_tf2" else None
        prefix, layout = module.checkpoint_prefix, module.kind
    else:
        prefix, rename, layout = path, None, "checkpoint"
    with CheckpointReader(prefix) as reader:
        yield CheckpointTensors(reader, rename, prefer_ema), reader.files, layout


@contextlib.contextmanager
def _open_local(path: Path, prefer_ema: bool, origin: tuple[str, str] | None = None):
    """Tensors of a local file/dir/prefix; ``origin`` (url, sha256) when it was downloaded."""
    scratch = None
    try:
        if path.suffix == ".safetensors" and path.is_file():
            raise ValueError(f"{path} is already converted; load it with imvec.load({str(path)!r})")
        if origin and not is_archive(path):
            size = path.stat().st_size
            path.unlink()  # e.g. an HTML error page served with status 200: fetch again next time
            raise ImvecError(f"{origin[0]} served {size} bytes that are not a tar or zip "
                             "archive; the file was removed from the cache")
        if path.is_file() and is_archive(path):
            sha = origin[1] if origin else store.sha256_file(path)
            scratch = store.tmp_dir() / f"{sha[:16]}-{uuid.uuid4().hex[:8]}"
            kind, found = _find_model(extract(path, scratch))
            origin = origin or (str(path), sha)
        elif path.is_dir():
            kind, found = _find_model(path)
        elif path.name.endswith(".index") or Path(f"{path}.index").is_file():
            kind, found = "checkpoint", Path(str(path).removesuffix(".index"))
        elif path.is_file():
            raise ImvecError(f"{path} is neither a tar or zip archive, a TF checkpoint nor a "
                             "safetensors file")
        else:
            raise FileNotFoundError(f"{path} does not exist")
        with _open_checkpoint_or_module(kind, found, prefer_ema) as (tensors, files, layout):
            source, sha = origin or (str(path), sha256_of_files(files))
            yield tensors, source, sha, layout
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def weights_values(tensors: CheckpointTensors, card: Card | None, prefer_ema: bool) -> str:
    """What the converted file holds, for its metadata; refuses an EMA request that the
    source cannot meet (silently giving raw values would defeat the option)."""
    module_ema = card is not None and _module_values(card) == "ema"
    if tensors.values == "as saved" and module_ema:
        return "ema (the module's values: exported from the moving averages, plain names)"
    if prefer_ema and tensors.values != "ema":
        raise ImvecError("EMA weights were asked for (--ema / prefer_ema=True), but the source "
                         f"holds no {EMA_SUFFIX} copies (its values: {tensors.values}); drop "
                         "the option, or use a TF-Slim checkpoint that holds them")
    return tensors.values


def _module_values(card: Card) -> str:
    """"ema" where the handle's own module holds moving averages (AmoebaNet), else "raw"."""
    hub = [m.values for m in card.mirrors if m.kind == "hub_tf1"]
    return "ema" if hub and all(v == "ema" for v in hub) else "raw"


@contextlib.contextmanager
def open_source(source: str | os.PathLike, arch: str | None = None, *, prefer_ema: bool = False,
                progress: bool | None = None) -> Iterator[Opened]:
    """The tensors of any SOURCE (see the module doc), downloading what is needed.

    A registry handle opens the first of its mirrors that downloads and unpacks.
    """
    text = os.fspath(source)
    card = card_for(text, arch) if arch is not None else identify(text)
    with contextlib.ExitStack() as stack:
        if is_registry_name(text):
            opened = _first_mirror(card, lambda path, origin, _label: stack.enter_context(
                _open_local(path, prefer_ema, origin)), prefer_ema, progress)
        elif _is_url(text):
            url = _archive_url(text)
            path = store.fetch(url, **_pins(url), progress=progress)
            opened = stack.enter_context(_open_local(path, prefer_ema, (url, _sha(path))))
        else:
            opened = stack.enter_context(_open_local(Path(text).expanduser(), prefer_ema))
        yield Opened(opened[0], card, *opened[1:])


def _first_mirror(card: Card, use, prefer_ema: bool, progress: bool | None,
                  limits: store.Limits | None = None):
    """``use(path, origin, label)`` on the first of the card's sources that works: modules
    other tools downloaded (``origin`` None), then the mirrors (cached downloads first, origin
    (url, sha256)), all within one time limit."""
    failures = []
    for found in _tool_caches(card, prefer_ema):
        try:
            return use(found.path, None, found.label)
        except (ImvecError, ValueError, OSError) as e:
            log.warning("imvec: %s (%s) does not convert: %s; trying the card's sources "
                        "instead", found.path, found.handle, e)
    clock = store.Clock.start(limits)
    for mirror in _mirror_order(card, prefer_ema):
        if clock.total_expired() and not store.download_path(mirror.url).is_file():
            failures.append(f"{mirror.url}: not tried, the time limit of "
                            f"{clock.limits.total_s:.0f} s (IMVEC_DOWNLOAD_TOTAL_S) was reached")
            continue
        try:
            path = store.fetch(mirror.url, sha256=mirror.sha256, size=mirror.size,
                               progress=progress, clock=clock.next_source())
            return use(path, (mirror.url, _sha(path)), mirror.url)
        except (ImvecError, OSError) as e:
            failures.append(_failure(mirror, e))
    raise _all_failed(card, failures, prefer_ema)


def _tool_caches(card: Card, prefer_ema: bool) -> list[tfhub_cache.CachedModule]:
    """Modules tensorflow_hub or kagglehub already downloaded (hub modules: raw values,
    except AmoebaNet's EMA ones, so they serve an EMA request only there)."""
    if prefer_ema and _module_values(card) != "ema":
        return []
    found = [tfhub_cache.find_module(card), tfhub_cache.find_kagglehub_module(card)]
    return [f for f in found if f is not None]


def _failure(mirror: Mirror, error: Exception) -> str:
    reason = str(error).replace(mirror.url, "it")  # the URL is named once, in front
    log.warning("imvec: %s failed: %s; trying the next source", mirror.url, reason)
    return f"{mirror.url}: {reason}"


def _convert_card(card: Card, output: Path, hparams: dict[str, Any] | None, prefer_ema: bool,
                  progress: bool | None, limits: store.Limits | None = None) -> Path:
    """Try the card's sources in order until one downloads, unpacks AND converts."""
    def use(path: Path, origin: tuple[str, str] | None, label: str) -> Path:
        with _open_local(path, prefer_ema, origin) as (tensors, _source, sha, _layout):
            return convert_tensors(tensors, card.handle, output, hparams, source=label,
                                   source_sha256=sha,
                                   values=weights_values(tensors, card, prefer_ema))

    return _first_mirror(card, use, prefer_ema, progress, limits)


def _sha(path: Path) -> str:
    record = store.read_record(path)
    return record.sha256 if record else store.sha256_file(path)


def _pins(url: str) -> dict[str, Any]:
    found = _mirror_of(url)
    return {"sha256": found[1].sha256, "size": found[1].size} if found else {}


def _mirror_order(card: Card, prefer_ema: bool = False) -> list[Mirror]:
    """The card's mirrors that can give the values asked for, those already downloaded first
    (they cost nothing, work offline)."""
    fitting = [m for m in card.mirrors if not prefer_ema or m.values in ("both", "ema")]
    return sorted(fitting, key=lambda m: not store.download_path(m.url).is_file())


def _all_failed(card: Card, failures: list[str], prefer_ema: bool = False) -> Exception:
    ema = " --ema" if prefer_ema else ""
    if store.is_offline():
        places = "\n".join(f"  {m.url}\n    -> {store.download_path(m.url)}"
                           for m in _mirror_order(card, prefer_ema))
        return store.OfflineError(
            f"{store.ENV_OFFLINE}=1 and no weights for {card.handle} are in the cache "
            f"({weights_path(card, prefer_ema)}). Either copy a converted file there (e.g. from "
            f"`imvec download {card.handle}{ema}` on a machine with internet, or copy that "
            f"machine's $IMVEC_HOME), or import a module or checkpoint you have with "
            f"`imvec cache add {card.handle} FILE{ema}` (a module tensorflow_hub downloaded "
            f"into {tfhub_cache.cache_dir()} is used as it is), or fetch one of these by hand "
            f"and put it at the path shown:\n{places}")
    listed = " ".join(f"[{i}] {f}." for i, f in enumerate(failures, 1))
    return store.DownloadError(
        f"no source of {card.handle} worked: {listed} To import the weights by hand: fetch "
        f"one of these URLs on any machine (e.g. `curl -L -o FILE URL`) and run `imvec cache "
        f"add {card.handle} FILE{ema}`; or check the connection (a proxy or internal mirror: "
        f"IMVEC_MIRROR_BASE; more time: IMVEC_DOWNLOAD_TOTAL_S)", card.url)


# -- converting ----------------------------------------------------------------------------
def convert_source(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    arch: str | None = None,
    hparams: dict[str, Any] | None = None,
    prefer_ema: bool = False,
    progress: bool | None = None,
) -> Path:
    """Convert any SOURCE into a self-describing ``.safetensors`` file at ``output``.

    Raw values by default; ``prefer_ema=True`` takes a TF-Slim checkpoint's moving averages
    (see the module doc). The choice is recorded in the metadata (``weights_values``).
    """
    text = os.fspath(source)
    card = card_for(text, arch)
    if is_registry_name(text):
        return _convert_card(card, Path(output), hparams, prefer_ema, progress)
    with open_source(text, card.handle, prefer_ema=prefer_ema, progress=progress) as opened:
        return convert_tensors(opened.tensors, card.handle, output, hparams,
                               source=opened.source, source_sha256=opened.source_sha256,
                               values=weights_values(opened.tensors, card, prefer_ema))


def weights_path(card: Card, prefer_ema: bool = False) -> Path:
    """Where the converted weights of a registry handle live in the cache (EMA weights,
    where they differ from the handle's own values, beside them)."""
    ema = "--ema" if prefer_ema and _module_values(card) != "ema" else ""
    return store.weights_dir() / f"{card.handle.replace('/', '--')}{ema}.safetensors"


def _locked_convert(out: Path, convert) -> Path:
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock", timeout=store.LOCK_TIMEOUT_S):
        if not out.is_file():  # else another process converted it while we waited
            convert()
    return out


def ensure_weights(card: Card, *, prefer_ema: bool = False, progress: bool | None = None,
                   limits: store.Limits | None = None) -> Path:
    """The converted weights of a registry card: from the cache, or downloaded and converted
    once (concurrent callers wait for the one doing it)."""
    out = weights_path(card, prefer_ema)

    def convert() -> None:
        _convert_card(card, out, None, prefer_ema, progress, limits)

    if not out.is_file() and store.is_offline() and not any(
            store.download_path(m.url).is_file() for m in _mirror_order(card, prefer_ema)
    ) and not _tool_caches(card, prefer_ema):
        raise _all_failed(card, [], prefer_ema)
    return _locked_convert(out, convert)


def _fingerprint(text: str, card: Card, prefer_ema: bool = False) -> str:
    """Identity of a local source for the cache: paths, sizes and mtimes (not contents)."""
    parts: list[Any] = [text, card.network, sorted(card.hparams.items())]
    parts += ["ema"] if prefer_ema else []
    if not _is_url(text):
        path = Path(text).expanduser().resolve()
        prefix_files = sorted(path.parent.glob(path.name + ".*")) if not path.exists() else []
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else (
            [path] if path.is_file() else prefix_files)
        parts += [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:16]


def source_weights_path(source: str, card: Card, prefer_ema: bool = False) -> Path:
    """Where :func:`ensure_source_weights` keeps a local SOURCE converted for ``card``."""
    key = _fingerprint(source, card, prefer_ema)
    return store.weights_dir() / f"{card.short_name}--{key}.safetensors"


def ensure_source_weights(source: str | os.PathLike, card: Card, *, prefer_ema: bool = False,
                          progress: bool | None = None) -> Path:
    """Converted weights for any non-registry SOURCE with its card, cached by the source's
    identity and the raw/EMA choice (a changed local file converts again)."""
    text = os.fspath(source)
    out = source_weights_path(text, card, prefer_ema)

    def convert() -> None:
        with open_source(text, card.handle, prefer_ema=prefer_ema, progress=progress) as opened:
            convert_tensors(opened.tensors, card.handle, out, source=opened.source,
                            source_sha256=opened.source_sha256,
                            values=weights_values(opened.tensors, card, prefer_ema))

    return _locked_convert(out, convert)
