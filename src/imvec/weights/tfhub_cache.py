"""Modules tensorflow_hub already downloaded: read from its cache instead of fetched again.

How tensorflow_hub lays out its cache (read in tensorflow/hub's ``resolver.py`` and
``compressed_module_resolver.py``, and observed with tensorflow-hub 0.16.1 itself, see
tests/fixtures/tfhub_cache/):

- the cache is ``$TFHUB_CACHE_DIR`` (its ``--tfhub_cache_dir`` flag is invisible from here),
  else ``<tempfile.gettempdir()>/tfhub_modules``;
- an http(s) handle is unpacked into ``sha1(handle).hexdigest()``, the hash of the handle
  string exactly as written (``https://tfhub.dev/google/imagenet/nasnet_mobile/feature_vector/3``;
  ``http://``, a trailing ``/`` or another version are other folders), without the
  ``?tf-hub-format=compressed`` query added for the download;
- the module is unpacked into ``<folder>.<uuid>.tmp`` and renamed when complete, so an
  existing folder is a whole module; ``<folder>.descriptor.txt`` beside it starts with
  ``Module: <handle>``, which names folders of other spellings.

Modules kagglehub downloaded are used too: ``$KAGGLEHUB_CACHE`` (default
``~/.cache/kagglehub``) ``/models/<owner>/<model>/<framework>/<variation>/<version>/``, complete
when ``<version>.complete`` exists beside it (kagglehub's cache.py). Nothing is ever written
into either cache.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from imvec.errors import UnknownHandleError
from imvec.registry import CARDS, Card, find_card

__all__ = ["ENV_CACHE_DIR", "ENV_KAGGLEHUB_CACHE", "CachedModule", "cache_dir",
           "card_of_module_dir", "find_kagglehub_module", "find_module", "handles_of",
           "kagglehub_dir", "module_dir_name"]

ENV_CACHE_DIR, ENV_KAGGLEHUB_CACHE = "TFHUB_CACHE_DIR", "KAGGLEHUB_CACHE"
_KAGGLE_URL = re.compile(r"/api/v1/models/([^/]+)/([^/]+)/([^/]+)/([^/]+)/(\d+)/download$")
DESCRIPTOR_SUFFIX = ".descriptor.txt"
log = logging.getLogger("imvec")


def cache_dir() -> Path:
    """Where tensorflow_hub keeps its modules on this machine."""
    configured = os.environ.get(ENV_CACHE_DIR, "")
    return Path(configured or Path(tempfile.gettempdir()) / "tfhub_modules").expanduser()


def module_dir_name(handle: str) -> str:
    return hashlib.sha1(handle.encode("utf8")).hexdigest()


def handles_of(card: Card) -> list[str]:
    """The handles tensorflow_hub may hold ``card``'s weights under, best first: its
    tfhub.dev URL, then the TF2 version the card lists as a mirror, https then http."""
    urls = [card.url] + [m.url.split("?", 1)[0] for m in card.mirrors
                         if m.kind == "saved_model_tf2" and "//tfhub.dev/" in m.url]
    return [u.replace("https://", scheme, 1) for u in urls for scheme in ("https://", "http://")]


@dataclass(frozen=True)
class CachedModule:
    path: Path
    handle: str  # the handle tensorflow_hub (or kagglehub) downloaded it as
    where: str = "TF-Hub cache"

    @property
    def label(self) -> str:
        """What the converted file records as its source."""
        return f"{self.handle} ({self.where}: {self.path})"


def _complete(path: Path) -> bool:
    return (path / "saved_model.pb").is_file() and (path / "variables" /
                                                    "variables.index").is_file()


def _descriptor_handle(module_dir: Path) -> str | None:
    try:
        first = module_dir.with_name(module_dir.name + DESCRIPTOR_SUFFIX).read_text(
            errors="replace").splitlines()[0]
    except (OSError, IndexError):
        return None
    return first.removeprefix("Module:").strip() if first.startswith("Module:") else None


def _names(handle: str, card: Card) -> bool:
    try:
        return find_card(handle).handle == card.handle
    except (UnknownHandleError, ValueError):
        return False


def find_module(card: Card) -> CachedModule | None:
    """``card``'s module in the TF-Hub cache, if tensorflow_hub downloaded it here."""
    root = cache_dir()
    if not root.is_dir():
        return None
    candidates = [(h, root / module_dir_name(h)) for h in handles_of(card)]
    if not any(path.is_dir() for _, path in candidates):  # other spellings, by descriptor
        try:
            descriptors = sorted(root.glob("*" + DESCRIPTOR_SUFFIX))
        except OSError:  # an unreadable cache is no reason to fail a load
            descriptors = []
        for descriptor in descriptors:
            path = descriptor.with_name(descriptor.name.removesuffix(DESCRIPTOR_SUFFIX))
            handle = _descriptor_handle(path)
            if handle and _names(handle, card):
                candidates.append((handle, path))
    for handle, path in candidates:
        if path.is_dir():
            if _complete(path):
                return CachedModule(path, handle)
            log.warning("imvec: %s (TF-Hub cache, %s) lacks saved_model.pb or "
                        "variables/variables.index; not used", path, handle)
    return None


def card_of_module_dir(path: str | os.PathLike) -> Card | None:
    """The card of a folder of a TF-Hub cache: named by its descriptor file, or by its name
    being the hash of one of a card's handles."""
    path = Path(path)
    handle = _descriptor_handle(path)
    if handle:
        try:
            return find_card(handle)
        except (UnknownHandleError, ValueError):
            pass  # e.g. the TF2 version of a module: its hash may still name it
    for card in CARDS:
        if path.name in {module_dir_name(h) for h in handles_of(card)}:
            return find_card(card.handle)
    return None


def kagglehub_dir() -> Path:
    """kagglehub's cache on this machine."""
    configured = os.environ.get(ENV_KAGGLEHUB_CACHE, "")
    return Path(configured or Path.home() / ".cache" / "kagglehub").expanduser()


def find_kagglehub_module(card: Card) -> CachedModule | None:
    """``card``'s module as kagglehub downloaded it (any Kaggle mirror of the card; the
    framework folder is spelled as the user typed it, so it is matched without case)."""
    root = kagglehub_dir() / "models"
    for mirror in card.mirrors:
        match = _KAGGLE_URL.search(mirror.url)
        if match is None:
            continue
        owner, model, framework, variation, version = match.groups()
        try:
            frameworks = [p for p in (root / owner / model).iterdir()
                          if p.name.lower() == framework.lower()]
        except OSError:
            continue
        for folder in frameworks:
            path = folder / variation / version
            if path.is_dir() and (folder / variation / f"{version}.complete").exists():
                handle = "/".join((owner, model, folder.name, variation, version))
                return CachedModule(path, handle, "kagglehub cache")
    return None
