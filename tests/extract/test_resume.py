"""Resume: kill -9 at any moment, rerun, and get what an uninterrupted run gets."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from extract_helpers import make_folder, module, save, weights  # noqa: F401 (fixtures)

import imvec
from imvec.errors import ImvecError
from imvec.extract import ExtractJob, read_features, run, workdir
from imvec.extract.workdir import ResumeError

SIZE = 32


def job(folder, model, out, **options):
    options = {"progress": False, "workers": 1, "size": SIZE, **options}
    return ExtractJob((str(folder),), model, out, **options)


def assert_same_result(out, reference):
    ids, features = read_features(out)
    ref_ids, ref = read_features(reference)
    assert ids == ref_ids  # every id exactly once, in the same order
    np.testing.assert_allclose(features, ref, rtol=1e-5, atol=1e-6)


def parts(out):
    return sorted((out.parent / (out.name + ".partial")).glob("part-*.parquet"))


def test_kill_9_at_any_moment_then_rerun_equals_an_uninterrupted_run(tmp_path, weights,
                                                                       module):
    folder = make_folder(tmp_path / "in", 240)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    reference = run(job(folder, module, tmp_path / "reference.parquet")).output
    out = tmp_path / "features.parquet"
    command = [sys.executable, "-m", "imvec.cli", "extract", str(folder), "--model",
               str(weights), "-o", str(out), "--size", str(SIZE), "--workers", "1",
               "--batch-size", "4", "--commit-every", "16", "--quiet"]
    rng = np.random.default_rng(0)
    killed = 0
    # Kill when 2 parts are committed, when 2 more are, then at random moments.
    for attempt in range(4):
        before = len(parts(out))
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + (60 if attempt < 2 else rng.uniform(0.5, 4.0))
        while process.poll() is None and time.monotonic() < deadline:
            if attempt < 2 and len(parts(out)) >= before + 2:
                break
            time.sleep(0.005)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            killed += 1
        process.wait(timeout=60)
        assert_no_survivors(out)
        if out.exists():
            break
    assert killed >= 2, "the job finished before it could be killed twice"
    final = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    assert "241 images" in final.stdout and "1 failed" in final.stdout
    assert "done by an earlier run" in final.stdout or "already complete" in final.stderr
    assert_same_result(out, reference)
    assert (tmp_path / "features.errors.csv").read_text() == (
        (tmp_path / "reference.errors.csv").read_text())
    assert not (tmp_path / "features.parquet.partial").exists()


def assert_no_survivors(out, grace: float = 5.0) -> None:
    """No process (e.g. a decoding worker) of a killed job lives on."""
    if not os.path.isdir("/proc"):
        return
    deadline = time.monotonic() + grace
    while True:
        alive = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if str(out).encode() in f.read():
                        alive.append(pid)
            except OSError:
                pass
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not alive, f"processes of the killed job still run: {alive}"


def test_interrupted_writes_and_unreadable_parts_are_recovered(tmp_path, module, monkeypatch):
    folder = make_folder(tmp_path / "in", 12)
    reference = run(job(folder, module, tmp_path / "reference.parquet")).output
    out = tmp_path / "f.parquet"
    crash_after(monkeypatch, 3)
    with pytest.raises(SimulatedCrash):
        run(job(folder, module, out, commit_every=4, batch_size=2))
    monkeypatch.undo()
    work = out.parent / "f.parquet.partial"
    committed = parts(out)
    assert committed and not out.exists()
    (work / "part-000099.parquet.tmp").write_bytes(b"PAR1 half a part")  # killed mid-write
    (work / "part-000100.parquet").write_bytes(b"garbage")  # e.g. a damaged disk
    result = run(job(folder, module, out))
    assert result.computed < 12 and any("unreadable part-000100" in n for n in result.notes)
    assert_same_result(out, reference)


class SimulatedCrash(Exception):
    pass


def crash_midway(folder, module, out, monkeypatch) -> None:
    """A run that crashes after its second batch of 2 (parts committed every 2 images)."""
    crash_after(monkeypatch, 2)
    with pytest.raises(SimulatedCrash):
        run(job(folder, module, out, commit_every=2, batch_size=2))
    monkeypatch.undo()


def crash_after(monkeypatch, batches: int) -> None:
    """Make the model fail on batch ``batches + 1`` (like a crash; committed parts stay)."""
    from imvec.extract import pipeline

    real = pipeline.model_embedder

    def embedder(module, device):
        embed, calls = real(module, device), []

        def maybe_crash(batch):
            calls.append(1)
            if len(calls) > batches:
                raise SimulatedCrash
            return embed(batch)

        return maybe_crash

    monkeypatch.setattr(pipeline, "model_embedder", embedder)


def test_different_model_or_preprocessing_refuses_to_append(tmp_path, module, monkeypatch):
    folder = make_folder(tmp_path / "in", 6)
    out = tmp_path / "f.parquet"
    crash_midway(folder, module, out, monkeypatch)
    assert parts(out)
    other = imvec.load("mobilenet_v1_050_160", pretrained=False)
    with pytest.raises(ResumeError, match=r"unfinished work made differently: model hparams "
                                          r"was .*weights_sha256 was .*--overwrite"):
        run(job(folder, other, out))
    with pytest.raises(ResumeError, match=r"model precision was 'float32', now 'bfloat16'"):
        run(job(folder, module.source, out, precision="bfloat16"))
    with pytest.raises(ResumeError, match=r"preprocessing crop was None, now 0.875.*"
                                          r"preprocessing size was \[32, 32\], now \[48, 48\]"):
        run(job(folder, module, out, crop=0.875, size=48))
    kept = parts(out)
    assert kept, "a refused run must keep the earlier work"
    result = run(job(folder, other, out, overwrite=True))
    assert result.computed == 6
    assert json.loads(pq.read_schema(out).metadata[b"imvec"])["model"]["hparams"][
        "depth_multiplier"] == 0.5
    with pytest.raises(ResumeError, match="exists and was made differently"):
        run(job(folder, module, out))


def test_disk_full_is_a_clear_error_that_keeps_what_was_written(tmp_path, module,
                                                                monkeypatch):
    folder = make_folder(tmp_path / "in", 10)
    reference = run(job(folder, module, tmp_path / "reference.parquet")).output
    out = tmp_path / "f.parquet"
    real = workdir.write_durably
    writes = []

    def full_after_two(path, write):
        writes.append(path)
        if len(writes) > 3:  # job.json, two parts, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(workdir, "write_durably", full_after_two)
    with pytest.raises(ImvecError, match=r"cannot write part .*: the disk is full\. 4 images "
                                         r"committed earlier are kept in .*rerun the same"):
        run(job(folder, module, out, commit_every=2, batch_size=2))
    assert len(parts(out)) == 2 and not list(out.parent.glob("f.parquet.partial/*.tmp"))
    monkeypatch.setattr(workdir, "write_durably", real)
    result = run(job(folder, module, out, commit_every=2))
    assert result.computed == 6
    assert_same_result(out, reference)


def test_disk_full_while_assembling_keeps_every_result(tmp_path, module, monkeypatch):
    from imvec.extract import sink

    folder = make_folder(tmp_path / "in", 5)
    out = tmp_path / "f.parquet"
    real = sink.write_durably

    def full(path, write):
        if path == out:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, write)

    monkeypatch.setattr(sink, "write_durably", full)
    with pytest.raises(ImvecError, match="disk is full. All 5 results are kept"):
        run(job(folder, module, out))
    monkeypatch.setattr(sink, "write_durably", real)
    assert run(job(folder, module, out)).computed == 0 and read_features(out)[1].shape[0] == 5


@pytest.mark.parametrize("crash_at", ["after_output", "deleting_work"])
def test_crash_while_finishing(tmp_path, module, monkeypatch, crash_at):
    folder = make_folder(tmp_path / "in", 5)
    reference = run(job(folder, module, tmp_path / "reference.parquet")).output
    out = tmp_path / "f.parquet"
    if crash_at == "after_output":
        monkeypatch.setattr(workdir.WorkDir, "retire", _raise)
    else:
        monkeypatch.setattr(workdir.shutil, "rmtree", _raise)
    with pytest.raises(KeyboardInterrupt):
        run(job(folder, module, out))
    monkeypatch.undo()
    assert out.exists()
    result = run(job(folder, module, out))
    assert result.computed == 0
    assert_same_result(out, reference)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "f.errors.csv", "f.parquet", "in", "reference.errors.csv", "reference.parquet"]


def _raise(*args, **kwargs):
    raise KeyboardInterrupt


def test_inputs_changed_between_runs(tmp_path, module, monkeypatch):
    folder = make_folder(tmp_path / "in", 8)
    out = tmp_path / "f.parquet"
    crash_midway(folder, module, out, monkeypatch)
    gone = sorted(folder.rglob("*.jpg"))[0]
    gone.unlink()
    save(np.full((64, 64, 3), 7, np.uint8), folder / "aaa.png")
    result = run(job(folder, module, out))
    reference = run(job(folder, module, tmp_path / "reference.parquet")).output
    assert result.total == 8
    assert_same_result(out, reference)


def test_repeated_rows_in_parts_are_kept_once(tmp_path, module, monkeypatch):
    folder = make_folder(tmp_path / "in", 6)
    out = tmp_path / "f.parquet"
    crash_midway(folder, module, out, monkeypatch)
    first = parts(out)[0]
    copy = first.with_name("part-r0copy.parquet")  # e.g. a retried Ray task
    table = pq.read_table(first)
    pq.write_table(pa.concat_tables([table, table]), copy)
    run(job(folder, module, out))
    ids, _ = read_features(out)
    assert len(ids) == len(set(ids)) == 6


def test_a_second_process_on_the_same_output_is_refused(tmp_path, module):
    folder = make_folder(tmp_path / "in", 2)
    out = tmp_path / "f.parquet"
    from filelock import FileLock

    (tmp_path / "f.parquet.partial").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from filelock import FileLock; "
        f"lock = FileLock({str(tmp_path / 'f.parquet.partial' / '.lock')!r}); lock.acquire(); "
        "print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ImvecError, match="another imvec process is writing"):
            run(job(folder, module, out))
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert run(job(folder, module, out)).ok == 2  # the lock died with its holder
    assert FileLock  # imported to show what holds the lock


def test_records_from_before_precision_was_recorded_read_as_float32():
    from imvec.extract.provenance import differences

    model = {"handle": "h", "weights_sha256": "s"}
    new = {"model": {**model, "precision": "float32"}, "preprocessing": {},
           "output_format": "parquet", "format": "imvec-features/1"}
    assert differences({**new, "model": model}, new) == []
    rounded = {**new, "model": {**model, "precision": "bfloat16"}}
    assert differences({**new, "model": model}, rounded) == [
        "model precision was 'float32', now 'bfloat16'"]
