"""``imvec.extract.run(job)``: list, resume, compute, assemble; the same for both engines."""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from imvec.data.sources import Item, list_images
from imvec.errors import ImvecError
from imvec.extract.job import ExtractJob, ExtractResult, default_batch_size
from imvec.extract.pool import default_workers
from imvec.extract.provenance import describe, differences, load_module, preprocessing_for
from imvec.extract.sink import OutputPaths, assemble, read_features, read_metadata
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
    module = load_module(job.model, job.precision)
    device = _device(job)
    preprocessing = preprocessing_for(module, job.size, job.crop, job.max_pixels)
    record = describe(module, preprocessing, job.format)
    dim = record["model"]["num_features"]
    paths = OutputPaths.for_output(job.output, job.format)
    items = list_images(job.inputs, job.path_column)
    work_path = work_dir_for(paths.output)
    for trash in work_path.parent.glob(f".{work_path.name}.*.done"):
        shutil.rmtree(trash, ignore_errors=True)  # a finished job's folder, half deleted

    if paths.output.exists() and not work_path.exists() and not job.overwrite:
        return _already_done(paths, record, items, start)
    paths.output.parent.mkdir(parents=True, exist_ok=True)
    work = WorkDir(work_path, record, dim, job.commit_every).open(job.overwrite)
    try:
        todo = [item for item in items if item.id not in work.done]
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
    if job.engine == "ray":
        from imvec.extract.ray_engine import run_ray

        run_ray(module, todo, work, preprocessing, batch_size, job.address, job.actors,
                update)
        return
    from imvec.extract.pipeline import run_local

    if next(module.parameters()).device != device:
        module.to(device)  # only when needed: moving drops the built inference engine
    run_local(module, todo, work, preprocessing, batch_size,
              job.workers or default_workers(), device, update)


def _already_done(paths: OutputPaths, record: dict, items: list[Item],
                  start: float) -> ExtractResult:
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
    ids, _ = read_features(paths.output)
    failed_paths = _error_paths(paths.errors)
    present = set(ids)
    new = [i for i in items if i.id not in present and i.path not in failed_paths]
    notes = []
    if new:
        notes.append(f"{len(new)} listed images are not in {paths.output} (added since it was "
                     "made?); pass --overwrite to compute everything again")
    return ExtractResult(paths.output, paths.errors, len(ids) + len(failed_paths), len(ids),
                         len(failed_paths), 0, time.perf_counter() - start, resumed=True,
                         notes=["already complete: nothing to compute", *notes])


def _error_paths(path: Path) -> set[str]:
    import csv

    if not path.is_file():
        return set()
    with open(path, newline="", encoding="utf-8") as f:
        return {row[0] for row in list(csv.reader(f))[1:]}
