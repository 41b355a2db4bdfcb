"""``imvec extract ... -o features/``: the job as a folder of shards (:mod:`.shards`).

The driver holds O(shards): the listing lives in the manifest, what is done in the
markers. A resume reads ``_imvec.json`` (refused if the model, preprocessing or inputs
differ), then per shard its marker: a shard is computed again when it has none, when its
weights digest differs, or when one of its inputs changed (size, mtime; with
``verify_inputs`` the content digest). The folder may be a URL prefix (:mod:`.folder`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import time

import numpy as np
from filelock import Timeout

from imvec.data.sources import Item, iter_images
from imvec.errors import ImvecError
from imvec.extract.fingerprint import Fingerprints, fingerprints, same
from imvec.extract.folder import LOCK, Folder
from imvec.extract.job import ExtractJob, ExtractResult
from imvec.extract.manifest import MANIFEST, manifest_ids, read_manifest, write_manifest
from imvec.extract.provenance import differences
from imvec.extract.shards import (
    DONE,
    ERRORS,
    JOB,
    inputs_sha256,
    read_marker,
    shard_name,
    write_shard,
)
from imvec.extract.table import ids_of
from imvec.extract.workdir import ResumeError

__all__ = ["open_dataset", "plan", "run_dataset"]

STAGING = ".listing"  # the manifest while it is written (hidden from Parquet readers)


def _inputs(job: ExtractJob) -> list[str]:
    return [i if "://" in i else os.path.abspath(i) for i in job.inputs]


def open_dataset(job: ExtractJob, record: dict) -> dict:
    """Check or create ``_imvec.json`` and the manifest; returns the job file's content."""
    folder = Folder(job.output)
    done = folder.is_file(JOB)
    if job.overwrite:
        _clear(folder)
        done = False
    elif not done:
        _drop_unfinished_listing(folder)
    if not done and any(name != LOCK for name in folder.names()):
        raise ImvecError(f"{folder} exists and is not an imvec output folder (no {JOB}); "
                         "name an empty or new folder, or a .parquet file")
    state = json.loads(folder.read_text(JOB)) if done else None
    if state is not None:
        reasons = differences(state["record"], record)
        if reasons:
            raise ResumeError(f"{folder} was made differently: {'; '.join(reasons)}. Pass "
                              "--overwrite to start again, or write to another folder")
        if state["inputs"] != _inputs(job) and not job.relist:
            raise ResumeError(f"{folder} was made from {', '.join(state['inputs'])}, not "
                              f"{', '.join(_inputs(job))}; pass --relist to add the images "
                              "it lacks, or write to another folder")
        if job.relist:
            state = _relist(folder, job, state)
        return state
    shards, images = _write_listing(folder, job)
    state = {"record": record, "inputs": _inputs(job), "shard_size": job.shard_size,
             "shards": shards, "images": images}
    folder.write_text(JOB, json.dumps(state, indent=1, sort_keys=True))  # listing done
    return state


def _relist(folder: Folder, job: ExtractJob, state: dict) -> dict:
    known = manifest_ids(folder, state["shards"])
    # new shards go after the last one the job file counts: a listing that fails (an id
    # clash is raised when it ends) leaves files that no run reads, and the next overwrites
    new = (i for i in iter_images(job.inputs, job.path_column) if i.id not in known)
    shards, images = write_manifest(folder, new, state["shard_size"], first=state["shards"])
    state = {**state, "inputs": _inputs(job),
             "shards": state["shards"] + shards, "images": state["images"] + images,
             "added": images}
    folder.write_text(JOB, json.dumps(state, indent=1, sort_keys=True))
    return state


def _write_listing(folder: Folder, job: ExtractJob) -> tuple[int, int]:
    """The listing, streamed into the manifest a shard at a time (driver memory: one shard),
    staged and renamed into place whole: a listing that fails (an id clash is raised only
    when it ends) leaves no manifest. The job file, written after, marks it complete."""
    folder.remove(STAGING)
    try:
        counts = write_manifest(folder.child(STAGING), iter_images(job.inputs,
                                                                   job.path_column),
                                job.shard_size)
        folder.move(f"{STAGING}/{MANIFEST}", MANIFEST)
    finally:
        folder.remove(STAGING)
    return counts


def _drop_unfinished_listing(folder: Folder) -> None:
    """A manifest without a job file is a listing killed before it ended: never trusted.
    Removed only where the folder holds nothing else and it only our shard names."""
    folder.remove(STAGING)
    names = folder.names()
    if MANIFEST not in names or any(name not in (MANIFEST, LOCK) for name in names):
        return
    if all(re.fullmatch(r"\d{5,}\.parquet", name) for name in folder.names(MANIFEST)):
        folder.remove(MANIFEST)


def _clear(folder: Folder) -> None:
    for name in (MANIFEST, DONE, STAGING, *folder.glob("shard-*.parquet"), JOB, ERRORS):
        folder.remove(name)


def _recorded(folder: Folder, index: int, marker: dict) -> dict[str, tuple]:
    """id -> fingerprint as shard ``index`` recorded it (its rows and its failures)."""
    table = folder.read_columns(shard_name(index), ["id", "id_bytes", "file_size",
                                                    "file_mtime_ns", "file_hash"])
    found = dict(zip(ids_of(table), zip(table.column("file_size").to_pylist(),
                                      table.column("file_mtime_ns").to_pylist(),
                                      table.column("file_hash").to_pylist(), strict=True),
                     strict=True))
    found.update((f["id"], (f["file_size"], f["file_mtime_ns"], f["file_hash"]))
                 for f in marker["failures"])
    return found


def plan(folder: str | os.PathLike | Folder, state: dict, record: dict, verify: bool,
         check_inputs: bool = True) -> tuple[list[int], list[str]]:
    """The shards to compute, and notes on why done ones are computed again."""
    folder = Folder.of(folder)
    pending, changed, redone, other_weights = [], 0, 0, 0
    for index in range(state["shards"]):
        marker = read_marker(folder, index)
        if marker is None or not folder.is_file(shard_name(index)):
            pending.append(index)
            continue
        if marker.get("weights_sha256") != record["model"]["weights_sha256"]:
            other_weights += 1
            pending.append(index)
            continue
        if not check_inputs:
            continue
        items = read_manifest(folder, index)
        now = fingerprints([i.path for i in items], verify)
        if not verify and inputs_sha256([i.id for i in items], now) == marker.get(
                "inputs_sha256"):
            continue
        old = _recorded(folder, index, marker)
        count = sum(not same(old.get(i.id, (-2, -2, None)), fp)
                    for i, fp in zip(items, now.rows(), strict=True))
        if count:
            changed += count
            redone += 1
            pending.append(index)
    notes = []
    if changed:
        notes.append(f"{changed} images changed since they were computed (size, mtime or "
                     f"content); their {redone} shards are computed again")
    if other_weights:
        notes.append(f"{other_weights} shards were computed with other weights; computed again")
    return pending, notes


def compute_shard(folder: str | os.PathLike | Folder, index: int, first: int,
                  items: list[Item], pool, embed, record: dict, verify: bool,
                  progress) -> None:
    """Decode and embed one shard's images, then write it (fingerprints taken first)."""
    prints = fingerprints([i.path for i in items], verify)
    ok: list[int] = []
    vectors: list[np.ndarray] = []
    failures = []
    at = 0
    for batch in pool.batches(items):
        features = embed(batch.images) if any(e is None for e in batch.errors) else None
        for row, error in enumerate(batch.errors):
            seq = at + row
            if error is None:
                ok.append(seq)
                vectors.append(features[row])
            else:
                size, mtime, digest = prints.row(seq)
                failures.append({"id": items[seq].id, "path": items[seq].path,
                                 "reason": error, "file_size": size, "file_mtime_ns": mtime,
                                 "file_hash": digest})
        at += len(batch.items)
        progress(len(batch.items))
    dim = record["model"]["num_features"]
    kept = Fingerprints(prints.size[ok], prints.mtime_ns[ok], [prints.hash[s] for s in ok])
    shard = {"first": first, "inputs_sha256": inputs_sha256([i.id for i in items], prints)}
    write_shard(folder, index, [items[s].id for s in ok],
                np.stack(vectors) if vectors else np.zeros((0, dim), np.float32),
                {**record, "shard": shard}, paths=[items[s].path for s in ok],
                fingerprints=kept, failures=failures)


def run_dataset(job: ExtractJob, record: dict, compute, start: float) -> ExtractResult:
    """Run ``job`` into its output folder; ``compute(pending, state)`` computes shards."""
    if job.format != "parquet":
        raise ValueError(f"an output folder holds Parquet shards; name a .{job.format} file "
                         "for that format")
    folder = Folder(job.output)
    folder.mkdir()
    lock = folder.lock()  # for a URL: this machine's processes only (see .folder)
    try:
        lock.acquire()
    except Timeout as exc:
        raise ImvecError(f"another imvec process is writing {folder} (its lock is held); "
                         "wait for it to finish or stop it") from exc
    try:
        state = open_dataset(job, record)
        pending, notes = plan(folder, state, record, job.verify_inputs)
        if state.get("added"):
            notes.append(f"{state['added']} images added by --relist")
        todo = sum(len(read_manifest(folder, k)) for k in pending)
        if pending:
            compute(pending, state, todo)
        else:
            notes.append("already complete: nothing to compute")
        ok, failed = _finish(folder, state)
    finally:
        lock.release()
    return ExtractResult(folder.path(), folder.path(ERRORS), ok + failed, ok, failed, todo,
                         time.perf_counter() - start, resumed=todo < ok + failed, notes=notes)


def _finish(folder: Folder, state: dict) -> tuple[int, int]:
    """Counts from the markers, and ``_errors.csv`` gathered from them."""
    ok = 0
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["path", "reason", "file_size", "file_mtime_ns", "file_hash"])
    failed = 0
    for index in range(state["shards"]):
        marker = read_marker(folder, index)
        if marker is None:
            raise ImvecError(f"shard {index} of {folder} has no result; rerun the same "
                             "command to compute it")
        ok += marker["rows"]
        failed += len(marker["failures"])
        for f in marker["failures"]:
            writer.writerow([f["path"], f["reason"], f["file_size"], f["file_mtime_ns"],
                             f["file_hash"] or ""])
    folder.write_bytes(ERRORS, text.getvalue().encode("utf-8", "surrogateescape"))
    return ok, failed
