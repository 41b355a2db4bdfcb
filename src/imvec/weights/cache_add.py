"""``imvec cache add HANDLE SOURCE``: weights fetched by hand become the cache's for a handle.

An air-gapped site often has the files already: a hub module ``.tar.gz``, its unpacked
folder, a TF-Slim checkpoint. Importing one checks that it holds every variable of the
handle's network with the right shape and nothing else (before anything is written),
converts it to where ``imvec.load(HANDLE)`` looks, and records the sha256 of what was
imported in the converted file. The registry's pinned hashes are those of the files its
mirrors serve: a different hash is reported with both values, but the import goes on,
because a re-exported or hand-made archive differs legitimately while the variables, the
part that matters, were checked exactly.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from imvec.errors import CheckpointMismatchError
from imvec.registry import Card, find_card
from imvec.weights import store
from imvec.weights.archives import is_archive
from imvec.weights.convert import convert_tensors
from imvec.weights.recognize import mismatches, recognize
from imvec.weights.sources import open_source, weights_path, weights_values

__all__ = ["Imported", "add_to_cache"]

log = logging.getLogger("imvec")
# the registry's mirror kind that serves each layout an archive can have
_MIRROR_KIND = {"hub_tf1": "hub_tf1", "saved_model_tf2": "saved_model_tf2",
                "checkpoint": "slim_tarball"}


@dataclass(frozen=True)
class Imported:
    card: Card
    path: Path  # the converted weights, where imvec.load(card.handle) finds them
    source: str
    layout: str  # "hub_tf1", "saved_model_tf2" or "checkpoint"
    sha256: str  # of the archive file, or of the checkpoint files of a folder / prefix
    pins: tuple[tuple[str, str], ...]  # (mirror URL, pinned sha256) comparable with it
    replaced: bool  # weights for the handle were in the cache before
    archive: bool  # SOURCE is an archive file (the registry pins archives' hashes)

    @property
    def pin_matches(self) -> bool | None:
        """None where nothing comparable is pinned (or SOURCE is not an archive)."""
        return any(sha == self.sha256 for _, sha in self.pins) if self.pins else None


def add_to_cache(handle: str, source: str | os.PathLike, *, variant: str | None = None,
                 prefer_ema: bool = False) -> Imported:
    """Import SOURCE (archive, module or checkpoint folder, checkpoint prefix) as the weights
    of ``handle``; raises, leaving the cache as it was, unless it is a complete module.
    Raw values unless ``prefer_ema`` (then stored where ``load(..., prefer_ema=True)`` looks)."""
    card = find_card(handle, variant)
    text = os.fspath(source)
    path = Path(text).expanduser()
    if "://" in text:
        raise ValueError(f"{text} is a URL; `imvec cache add` imports a file fetched by hand "
                         f"(`imvec download {card.handle}` downloads)")
    if path.suffix == ".safetensors":
        raise ValueError(f"{path} is already converted: copy it to {weights_path(card)} (or "
                         "load it with imvec.load)")
    if not (path.exists() or Path(f"{path}.index").is_file()):
        raise FileNotFoundError(f"{path} does not exist (SOURCE: a hub module .tar.gz, an "
                                "unpacked module or SavedModel folder, a folder holding one TF "
                                "checkpoint, or a checkpoint prefix such as .../model.ckpt)")
    out = weights_path(card, prefer_ema)
    out.parent.mkdir(parents=True, exist_ok=True)
    absolute = str(path.resolve())
    with FileLock(str(out) + ".lock", timeout=store.LOCK_TIMEOUT_S), \
            open_source(absolute, card.handle, prefer_ema=prefer_ema) as opened:
        shapes = {name: opened.tensors.shape(name) for name in opened.tensors}
        problems = mismatches(card, shapes)
        if problems:
            kept = f"; the weights already at {out} are kept" if out.is_file() else ""
            raise CheckpointMismatchError(f"{text} is not a complete {card.handle} module: "
                                          f"{'; '.join(problems)}. Nothing was imported{kept}."
                                          f"{_what_it_is(shapes, text)}")
        replaced = out.is_file()
        convert_tensors(opened.tensors, card.handle, out, source=absolute,
                        source_sha256=opened.source_sha256,
                        values=weights_values(opened.tensors, card, prefer_ema))
        layout, sha = opened.layout, opened.source_sha256
    archive = is_archive(path)
    pins = tuple((m.url, m.sha256.lower()) for m in card.mirrors
                 if m.sha256 and m.kind == _MIRROR_KIND[layout]) if archive else ()
    imported = Imported(card, out, absolute, layout, sha, pins, replaced, archive)
    if imported.pin_matches is False:
        pinned = "; ".join(f"{sha} for {url}" for url, sha in pins)
        log.warning("imvec: %s has sha256 %s, but the registry pins %s. Imported anyway: its "
                    "variables are a complete %s module (a re-exported or hand-made archive "
                    "differs legitimately); if it should be the official file, fetch it again",
                    text, sha, pinned, card.handle)
    return imported


def _what_it_is(shapes: dict[str, tuple[int, ...]], source: str) -> str:
    """A hint naming the handle SOURCE does fit, if any."""
    try:
        return f" It is a complete {recognize(shapes, source).handle} module."
    except CheckpointMismatchError:
        return ""
