"""``imvec.extract.run(job)``: list, resume, compute, assemble; the same for both runners."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Callable

import torch

from imvec.data.remote import is_url
from imvec.data.sources import Item, list_images
from imvec.errors import ImvecError
from imvec.extract.dataset import run_dataset
from imvec.extract.fingerprint import fingerprints, same
from imvec.extract.job import ExtractJob, ExtractResult, default_batch_size
from imvec.extract.pool import default_workers
from imvec.extract.provenance import describe, differences, load_module, preprocessing_for
from imvec.extract.shards import is_dataset
from imvec.extract.sink import OutputPaths, assemble, read_ids, read_metadata, recorded_inputs
from imvec.extract.workdir import ResumeError, WorkDir, work_dir_for

__all__ = ["run"]


def _device(job: ExtractJob) -> torch.device:
    if job.device:
        return torch.device(job.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _progress_bar(job: ExtractJob, total: int, done: int) -> tuple[Callable[[int], None], Callable]:
    if not job.progress:
        return (lambda n: None), (lambda: None)
    from tqdm import tqdm

    bar = tqdm(total=total, initial=done, unit="img", file=sys.stderr, dynamic_ncols=True,
               smoothing=0.1, desc="imvec extract")
    return bar.update, bar.close


def run(job: ExtractJob) -> ExtractResult:
    """Run ``job`` to completion (or continue it), and say what happened.

    Bad images are recorded in the errors file, not raised. Raises ImvecError (or
    ValueError / OSError) only when the job itself cannot go on; what was computed until
    then stays in the work folder for the next run.
    """
    start = time.perf_counter()
    if is_url(os.fspath(job.output)) and not is_dataset(job.output):
        # a single file is assembled in place from a local work folder: folders only
        raise ImvecError(f"-o {os.fspath(job.output)}: a URL output must name a folder prefix "
                         "(e.g. s3://bucket/features/), written as Parquet shards; or write "
                         "the file locally")
    module = load_module(job.model, job.precision, job.engine)
    device = _device(job)
    preprocessing = preprocessing_for(module, job.size, job.crop, job.max_pixels,
                                      job.accept_truncated)
    record = describe(module, preprocessing, job.format)
    if is_dataset(job.output):
        return run_dataset(job, record, _shard_computer(job, module, record, preprocessing,
                                                        device), start)
    dim = record["model"]["num_features"]
    paths = OutputPaths.for_output(job.output, job.format)
    items = list_images(job.inputs, job.path_column)
    work_path = work_dir_for(paths.output)
    for trash in work_path.parent.glob(f".{work_path.name}.*.done"):
        shutil.rmtree(trash, ignore_errors=True)  # a finished job's folder, half deleted

    if paths.output.exists() and not work_path.exists() and not job.overwrite:
        return _already_done(paths, record, items, start, job.verify_inputs)
    paths.output.parent.mkdir(parents=True, exist_ok=True)
    work = WorkDir(work_path, record, dim, job.commit_every).open(job.overwrite)
    try:
        todo = _todo(items, work, job.verify_inputs)
        update, close = _progress_bar(job, len(items), len(items) - len(todo))
        try:
            if todo:
                _compute(job, module, todo, work, preprocessing, device, update)
        except BaseException:
            with contextlib.suppress(Exception):
                work.commit()  # what finished before a failure or Ctrl-C is kept
            raise
        finally:
            close()
        work.commit()
        ok, failed = assemble(items, work.parts, record, dim, paths, job.format)
        work.retire()
    finally:
        work.release()
    return ExtractResult(paths.output, paths.errors, len(items), ok, failed, len(todo),
                         time.perf_counter() - start, resumed=len(todo) < len(items),
                         notes=work.notes)


def _compute(job, module, todo, work, preprocessing, device, update) -> None:
    batch_size = job.batch_size or default_batch_size(module.card.network, device.type)
    if job.runner == "ray":
        from imvec.extract.ray_engine import run_ray

        run_ray(module, todo, work, preprocessing, batch_size, job.address, job.actors,
                update)
        return
    from imvec.extract.pipeline import run_local

    if next(module.parameters()).device != device:
        module.to(device)  # only when needed: moving drops the built inference engine
    run_local(module, todo, work, preprocessing, batch_size,
              job.workers or default_workers(), device, update,
              decode_timeout=job.decode_timeout)


def _shard_computer(job, module, record, preprocessing, device) -> Callable:
    """``compute(pending, state, todo)`` for an output folder: shards written as they end."""
    def compute(pending: list[int], state: dict, todo: int) -> None:
        from imvec.extract.pipeline import run_shards_local

        update, close = _progress_bar(job, state["images"], state["images"] - todo)
        batch_size = job.batch_size or default_batch_size(module.card.network, device.type)
        if job.runner == "ray":
            from imvec.extract.ray_engine import run_shards_ray

            try:  # each actor writes the shards it computed, with their done markers
                run_shards_ray(module, job.output, pending, state["shard_size"], record,
                               preprocessing, batch_size, job.address, job.actors, update,
                               job.verify_inputs)
            finally:
                close()
            return
        if next(module.parameters()).device != device:
            module.to(device)
        try:
            run_shards_local(module, job.output, pending, state["shard_size"], record,
                             preprocessing, batch_size, job.workers or default_workers(),
                             device, update, job.verify_inputs, job.decode_timeout)
        finally:
            close()

    return compute


def _todo(items: list[Item], work: WorkDir, verify: bool) -> list[Item]:
    """Images not done yet or whose file changed since, each fingerprinted before it is read."""
    done = [item for item in items if item.id in work.done]
    now = fingerprints([item.path for item in done], verify).rows()
    changed = {item.id for item, fp in zip(done, now, strict=True)
               if not same(work.recorded[item.id], fp)}
    if changed:
        work.notes.append(f"{len(changed)} images changed since they were computed (size, "
                          "mtime or content); computed again")
    todo = [item for item in items if item.id not in work.done or item.id in changed]
    work.fingerprints = dict(zip((item.id for item in todo),
                                 fingerprints([item.path for item in todo], verify).rows(),
                                 strict=True))
    return todo


def _already_done(paths: OutputPaths, record: dict, items: list[Item], start: float,
                  verify: bool) -> ExtractResult:
    """The output exists and nothing is unfinished: report it, or refuse if it differs."""
    try:
        old = read_metadata(paths.output)
    except ImvecError as exc:
        raise ImvecError(f"{paths.output} exists and is not an imvec result ({exc}); pass "
                         "--overwrite to replace it") from exc
    reasons = differences(old, record)
    if reasons:
        raise ResumeError(f"{paths.output} exists and was made differently: "
                          f"{'; '.join(reasons)}. Pass --overwrite to replace it, or write "
                          "to another file")
    ids, prints = read_ids(paths.output)  # ids only: never the vectors
    failed = recorded_inputs(paths)
    held = dict(zip(ids, prints, strict=True))
    new = changed = 0
    for item, now in zip(items, fingerprints([i.path for i in items], verify).rows(),
                         strict=True):
        old = held.get(item.id, failed.get(item.path))
        if old is None:
            new += 1
        elif not same(old, now):
            changed += 1
    if new or changed:
        what = " and ".join(text for count, text in (
            (new, f"{new} listed images are not in it"),
            (changed, f"{changed} images changed since it was made")) if count)
        raise ResumeError(f"{paths.output} is complete but {what}; pass --overwrite to compute "
                          "it again, or write to an output folder (-o DIR/), which adds and "
                          "recomputes only those")
    return ExtractResult(paths.output, paths.errors, len(ids) + len(failed), len(ids),
                         len(failed), 0, time.perf_counter() - start, resumed=True,
                         notes=["already complete: nothing to compute"])
