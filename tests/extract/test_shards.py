"""Output folders (issue 19): shards written where computed, done markers, per-shard resume."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from extract_helpers import make_folder, module, pattern, save, weights  # noqa: F401 (fixtures)

from imvec.extract import ExtractJob, read_features, read_metadata, run
from imvec.extract.shards import done_marker, shard_path, write_shard
from imvec.extract.workdir import ResumeError

SIZE = 32


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    folder = make_folder(tmp_path_factory.mktemp("in"), 20)
    (folder / "group1" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory, collection, module):
    """The single-file result: what every output folder must hold."""
    out = tmp_path_factory.mktemp("ref") / "ref.parquet"
    run(job(collection, module, out))
    return read_features(out)


def job(folder, model, out, **options):
    options = {"progress": False, "workers": 1, "size": SIZE, "shard_size": 6, **options}
    return ExtractJob((str(folder),), model, out, **options)


def assert_equal_to(result, reference):
    ids, vectors = result
    assert ids == reference[0]  # every image exactly once, in listing order
    np.testing.assert_allclose(vectors, reference[1], rtol=1e-5, atol=1e-6)


def test_a_folder_is_one_table_for_every_reader(tmp_path, collection, module, reference):
    out = tmp_path / "features"
    result = run(job(collection, module, out))
    assert (result.total, result.ok, result.failed) == (21, 20, 1)
    assert sorted(p.name for p in out.glob("*.parquet")) == [
        f"shard-{k:05d}.parquet" for k in range(4)]  # 21 images, 6 per shard
    assert "broken.jpg,not an image" in (out / "_errors.csv").read_text()
    assert_equal_to(read_features(out), reference)
    table = ds.dataset(out, format="parquet").to_table()
    assert table.column("id").to_pylist() == reference[0]
    pd = pytest.importorskip("pandas")
    frame = pd.read_parquet(out)
    np.testing.assert_array_equal(np.stack(frame["feature"].to_numpy()),
                                  read_features(out)[1])
    pl = pytest.importorskip("polars")
    assert pl.read_parquet(out / "*.parquet")["id"].to_list() == reference[0]
    duckdb = pytest.importorskip("duckdb")
    rows = duckdb.sql(f"SELECT id, len(feature) FROM '{out}/*.parquet' ORDER BY id").fetchall()
    assert rows == sorted((i, 256) for i in reference[0])
    record = read_metadata(out)
    shard = ds.dataset(out, format="parquet").schema.metadata
    assert json.loads(shard[b"imvec"])["model"] == record["model"]
    again = run(job(collection, module, out))
    assert again.computed == 0 and "already complete" in again.notes[-1]


def test_write_shard_is_atomic_and_marks_done_last(tmp_path, module):
    from imvec.extract.provenance import describe, preprocessing_for

    record = describe(module, preprocessing_for(module, SIZE, None, None), "parquet")
    vectors = np.arange(2 * 256, dtype=np.float32).reshape(2, 256)
    path = write_shard(tmp_path, 3, ["a.jpg", "b.jpg"], vectors, record,
                       failures=[{"id": "c.jpg", "path": "c.jpg", "reason": "not an image",
                                  "file_size": 3, "file_mtime_ns": 1, "file_hash": None}])
    assert path == shard_path(tmp_path, 3) and done_marker(tmp_path, 3).is_file()
    marker = json.loads(done_marker(tmp_path, 3).read_text())
    assert (marker["rows"], marker["failures"][0]["id"]) == (2, "c.jpg")
    table = ds.dataset(tmp_path, format="parquet").to_table()
    np.testing.assert_array_equal(np.stack(table.column("feature").to_numpy(
        zero_copy_only=False)), vectors)
    assert sorted(p.name for p in tmp_path.rglob("*")) == [
        "00003.json", "_done", "shard-00003.parquet"]  # no temporary file left


def _extract_command(source: str, weights, out) -> list[str]:
    """The CLI job of these tests: small batches and shards, so it can be killed between."""
    return [sys.executable, "-m", "imvec.cli", "extract", source, "--model", str(weights),
            "-o", str(out), "--size", str(SIZE), "--workers", "1", "--batch-size", "2",
            "--shard-size", "3", "--quiet"]


def _kill_twice(command: list[str], out) -> int:
    """Run ``command``, SIGKILL it once 2 shards are done, run it again, SIGKILL it once 4
    are; returns how many runs were killed (a run that finished first was not)."""
    killed = 0
    for wanted in (2, 4):
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while (process.poll() is None and time.monotonic() < deadline
               and len(list(out.glob("_done/*.json"))) < wanted):
            time.sleep(0.005)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            killed += 1
        process.wait(timeout=60)
    return killed


def test_kill_9_then_resume_equals_an_uninterrupted_run(tmp_path, collection, weights,
                                                       reference):
    out = tmp_path / "features"
    command = _extract_command(str(collection), weights, out)
    assert _kill_twice(command, out) == 2, "the job finished before it could be killed twice"
    assert len(list(out.glob("_done/*.json"))) < 7
    final = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    assert "21 images" in final.stdout and "done by an earlier run" in final.stdout
    assert_equal_to(read_features(out), reference)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def _inputs_of_kind(kind: str, folder, root) -> str:
    """The collection as the input ``kind`` (the s3 one needs the server running)."""
    files = sorted(folder.rglob("*.jpg"))
    if kind == "folder":
        return str(folder)
    if kind == "glob":
        return f"{folder}/*/*.jpg"
    if kind == "table":
        table = root / "list.parquet"
        pq.write_table(pa.table({"path": [str(f) for f in files]}), table)
        return str(table)
    if kind == "webdataset":
        from moto_s3 import make_shard

        for index in range(3):
            make_shard(root / "wds" / f"{index:05d}.tar",
                       [(f"{f.parent.name}-{f.stem}", {"jpg": f.read_bytes()})
                        for f in files[7 * index:7 * index + 7]])
        return f"{root}/wds/{{00000..00002}}.tar"
    from moto_s3 import upload_tree

    upload_tree(S3[0], folder, "photos/set")
    return "s3://photos/set"


S3: list = [None]  # the running server's file system, for the s3 kind


@pytest.mark.parametrize("kind", ["folder", "glob", "table", "webdataset", "s3"])
def test_every_input_kind_resumes_after_kill_9_with_each_image_once(tmp_path, collection,
                                                                    weights, kind):
    """Killed twice mid-run (SIGKILL), then finished: the folder equals an uninterrupted
    run of the same inputs (ids, order, vectors) for every kind of input."""
    with contextlib.ExitStack() as stack:
        if kind == "s3":
            pytest.importorskip("s3fs")
            pytest.importorskip("moto.server")
            from moto_s3 import s3_server

            S3[0] = stack.enter_context(s3_server())  # its settings reach the subprocesses
        source = _inputs_of_kind(kind, collection, tmp_path)
        reference = read_features(run(job(source, weights, tmp_path / "whole",
                                          shard_size=3)).output)
        out = tmp_path / "features"
        command = _extract_command(source, weights, out)
        assert _kill_twice(command, out) == 2
        assert len(list(out.glob("_done/*.json"))) < len(list(out.glob("_manifest/*")))
        final = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert final.returncode == 0, final.stderr
        assert "done by an earlier run" in final.stdout
        assert_equal_to(read_features(out), reference)
        assert len(reference[0]) == 20  # the broken file is reported, in every kind


def test_resume_recomputes_only_shards_whose_inputs_or_weights_changed(tmp_path, module):
    folder = make_folder(tmp_path / "in", 12)
    out = tmp_path / "features"
    run(job(folder, module, out))
    shards = sorted(out.glob("shard-*.parquet"))
    stamps = [p.stat().st_mtime_ns for p in shards]
    changed = sorted(folder.rglob("*.jpg"))[0]  # listed first: shard 0
    mtime = changed.stat().st_mtime_ns
    save(pattern(64, 64, seed=99), changed)
    os.utime(changed, ns=(mtime + 10**9, mtime + 10**9))
    marker = done_marker(out, 1)
    marker.write_text(marker.read_text().replace(
        json.loads(marker.read_text())["weights_sha256"], "0" * 64))
    result = run(job(folder, module, out))
    assert result.computed == 12
    assert "1 images changed since they were computed" in " ".join(result.notes)
    assert "1 shards were computed with other weights" in " ".join(result.notes)
    assert [p.stat().st_mtime_ns != s for p, s in zip(shards, stamps, strict=True)] == [
        True, True]
    fresh = run(job(folder, module, tmp_path / "again", overwrite=True))
    assert_equal_to(read_features(out), read_features(fresh.output))


def test_other_inputs_are_refused_or_added_with_relist(tmp_path, module):
    folder = make_folder(tmp_path / "in", 7)
    out = tmp_path / "features"
    run(job(folder, module, out))
    other = tmp_path / "more"
    save(pattern(64, 64, seed=5), other / "extra.png")
    with pytest.raises(ResumeError, match="was made from .* pass --relist"):
        run(job(other, module, out))
    save(pattern(64, 64, seed=6), folder / "new.png")
    assert run(job(folder, module, out)).computed == 0  # the manifest: no listing again
    result = run(job(folder, module, out, relist=True))
    assert result.computed == 1 and "1 images added by --relist" in result.notes
    assert read_features(out)[0][-1] == "new.png"  # a new shard after the others
    result = ExtractJob((str(folder), str(other)), module, out, progress=False, workers=1,
                        size=SIZE, shard_size=6, relist=True)
    assert run(result).computed == 1 and len(read_features(out)[0]) == 9


def test_a_finished_folder_is_checked_without_reading_vectors(tmp_path, module,
                                                             monkeypatch):
    from imvec.extract import arrow
    from imvec.extract import folder as output_folder

    folder = make_folder(tmp_path / "in", 5)
    out = tmp_path / "features"
    run(job(folder, module, out))
    real = arrow.read_columns

    def no_vectors(path, columns):
        assert "feature" not in columns, f"{path} read with its vectors"
        return real(path, columns)

    monkeypatch.setattr(output_folder, "read_columns", no_vectors)
    monkeypatch.setattr(arrow, "read_columns", no_vectors)
    assert run(job(folder, module, out, verify_inputs=True)).computed == 0


@pytest.mark.skipif(sys.platform != "linux", reason="Linux allows any bytes in a name")
def test_names_that_are_not_utf8_in_a_folder(tmp_path, module):
    folder = make_folder(tmp_path / "in", 2)
    with open(os.path.join(os.fsencode(folder), b"\xff\xfe.jpg"), "wb") as f:
        f.write((folder / "group0" / "img0000.jpg").read_bytes())
    out = tmp_path / "features"
    assert run(job(folder, module, out)).ok == 3
    ids, _ = read_features(out)
    assert os.fsdecode(b"\xff\xfe.jpg") in ids
    assert run(job(folder, module, out)).computed == 0
    assert pa.__version__  # the table readers see the id as text: \xff\xfe.jpg
    assert "\\xff\\xfe.jpg" in ds.dataset(out, format="parquet").to_table().column(
        "id").to_pylist()


def test_the_doc_page_stays_true(tmp_path, collection, module, monkeypatch):
    import re
    import shlex
    from pathlib import Path

    from imvec.cli import build_parser

    page = (Path(__file__).parents[2] / "docs" / "sharded-output.md").read_text()
    for block in re.findall(r"```bash\n(.*?)```", page, re.S):
        for line in block.splitlines():
            if line.startswith("imvec "):
                build_parser().parse_args(shlex.split(line)[1:])
    run(job(collection, module, tmp_path / "features"))
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    (snippet,) = re.findall(r"```python\n(.*?)```", page, re.S)
    exec(snippet, scope)
    assert scope["table"].num_rows == len(scope["ids"]) == 20


def test_the_listing_is_streamed_and_a_failed_one_leaves_no_manifest(tmp_path, module,
                                                                      monkeypatch):
    """Ids clash only when the listing ends: shards were written by then, and none may stay
    for a later run to trust."""
    from imvec.data import sources
    from imvec.errors import InputError
    from imvec.extract import dataset

    out = tmp_path / "features"
    first, second = make_folder(tmp_path / "a", 4), make_folder(tmp_path / "b", 4)
    seen_on_disk = []

    def streamed(inputs, path_column="path"):
        for count, item in enumerate(sources.iter_images(inputs, path_column)):
            if count == 3:  # shards 0 and 1 (of 1 image each) must be on disk by now
                seen_on_disk.append(len(list(out.rglob("*.parquet"))))
            yield item

    monkeypatch.setattr(dataset, "iter_images", streamed)
    with pytest.raises(InputError, match="ids name two different files"):
        run(ExtractJob((str(first), str(second)), module, out, progress=False, workers=1,
                       size=SIZE, shard_size=1))
    assert seen_on_disk and seen_on_disk[0] >= 2  # written while listing, not after
    assert not (out / "_manifest").exists() and not (out / "_imvec.json").exists()
    assert sorted(p.name for p in out.iterdir()) == [".lock"]
    result = run(job(first, module, out, shard_size=1))  # the folder is usable as new
    assert (result.total, result.computed) == (4, 4)
    single = run(job(first, module, tmp_path / "one.parquet")).output
    assert read_features(out)[0] == read_features(single)[0]


def test_a_manifest_left_by_a_killed_listing_is_not_trusted(tmp_path, module):
    folder = make_folder(tmp_path / "in", 3)
    out = tmp_path / "features"
    (out / "_manifest").mkdir(parents=True)  # killed after the rename, before the job file
    (out / "_manifest" / "00000.parquet").write_bytes(b"partial")
    result = run(job(folder, module, out, shard_size=2))
    assert (result.total, result.ok) == (3, 3)


@pytest.mark.parametrize("output", ["s3://bucket/f.parquet", "s3://bucket/f.npy"])
def test_a_single_file_url_is_refused_and_no_local_folder_is_made(tmp_path, module,
                                                                  monkeypatch, output):
    from imvec.errors import ImvecError

    monkeypatch.chdir(tmp_path)
    folder = make_folder(tmp_path / "in", 1)
    with pytest.raises(ImvecError, match="a URL output must name a folder prefix"):
        run(job(folder, module, output))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_a_shard_whose_every_image_fails_is_done_with_no_rows(tmp_path, module):
    """Shard 1 holds only broken files: it is written (no rows), marked done, and the
    folder reads as the good images; a re-run has nothing to compute."""
    folder = make_folder(tmp_path / "in", 3)
    for name in ("x1.jpg", "x2.jpg", "x3.jpg"):  # listed after group*/: shard 1
        (folder / name).write_bytes(b"not an image")
    out = tmp_path / "features"
    result = run(job(folder, module, out, shard_size=3))
    assert (result.ok, result.failed) == (3, 3)
    assert json.loads(done_marker(out, 1).read_text())["rows"] == 0
    assert len(read_features(out)[0]) == 3
    assert pq.read_table(shard_path(out, 1)).num_rows == 0
    assert "already complete: nothing to compute" in run(job(folder, module, out)).notes


def test_a_file_url_names_a_local_folder(tmp_path, collection, module, reference):
    out = tmp_path / "features"
    result = run(job(collection, module, f"file://{out}"))
    assert result.ok == 20 and (out / "_imvec.json").is_file()
    assert_equal_to(read_features(f"file://{out}"), reference)
    assert read_metadata(f"file://{out}/") == read_metadata(out)
