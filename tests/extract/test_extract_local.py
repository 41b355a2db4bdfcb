"""imvec.extract.run on the local engine: right vectors, every kind of image, the files."""

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import assert_close
from extract_helpers import (  # noqa: F401 (fixtures)
    BAD,
    GOOD,
    every_kind,
    make_folder,
    module,
    reference_features,
    save,
    weights,
)

import imvec
from imvec.errors import InputError
from imvec.extract import ExtractJob, read_features, read_metadata, run
from imvec.extract.workdir import ResumeError
from imvec.weights.convert import read_metadata as weights_metadata

SIZE = 32  # the sample images are 64x64: the reference resize is a 2x2 block mean


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kinds")
    every_kind(folder)
    return folder


def job(inputs, model, output, **options):
    options.setdefault("progress", False)
    options.setdefault("workers", 2)
    return ExtractJob(tuple(map(str, inputs)) if isinstance(inputs, list) else (str(inputs),),
                      model, output, **options)


def test_vectors_equal_the_module_on_independently_prepared_images(kinds, module, weights,
                                                                    tmp_path):
    result = run(job(kinds, weights, tmp_path / "features.parquet", size=SIZE, batch_size=3))
    assert (result.total, result.ok, result.failed) == (len(GOOD) + len(BAD), len(GOOD), len(BAD))
    ids, features = read_features(result.output)
    assert ids == GOOD  # sorted ids, failures left out
    assert features.dtype == np.float32 and features.shape == (len(GOOD), 256)
    references = [reference_features(module, kinds / name, SIZE) for name in ids]
    for name, vector, reference in zip(ids, features, references, strict=True):
        assert_close(name, vector, reference)
    # The check has teeth: two images' vectors differ by far more than the tolerance.
    assert np.abs(references[0] - references[-1]).max() > 1e3 * 1e-5 * np.abs(
        references[0]).max()
    with open(tmp_path / "features.errors.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "reason", "file_size", "file_mtime_ns", "file_hash"]
    assert [r[0] for r in rows[1:]] == [str(kinds / name) for name in sorted(BAD)]
    for (path, reason, size, *_), name in zip(rows[1:], sorted(BAD), strict=True):
        assert BAD[name] in reason, (path, reason)
        assert int(size) == (kinds / name).stat().st_size
    assert not (tmp_path / "features.parquet.partial").exists()


def test_schema_and_metadata(kinds, converted, tmp_path):
    weights = converted("mobilenet_v1_025_128")  # a converted TF checkpoint
    result = run(job(kinds, weights, tmp_path / "f.parquet", size=SIZE))
    parquet = pq.ParquetFile(result.output)
    schema = parquet.schema_arrow
    assert schema.names == ["id", "path", "feature", "id_bytes", "file_size", "file_mtime_ns",
                            "file_hash"]
    assert schema.field("feature").type == pa.list_(pa.float32(), 256)
    record = read_metadata(result.output)
    assert record == json.loads(schema.metadata[b"imvec"])
    assert record["model"]["handle"] == "google/imagenet/mobilenet_v1_050_160/feature_vector/3"
    assert record["model"]["source_sha256"] == weights_metadata(weights)["source_sha256"]
    assert record["model"]["weights_sha256"] == tensors_sha256(imvec.load(weights).net)
    assert record["model"]["hparams"]["depth_multiplier"] == 0.25
    assert schema.metadata[b"imvec.weights_sha256"].decode() == record["model"][
        "weights_sha256"]
    pre = record["preprocessing"]
    assert pre["size"] == [SIZE, SIZE] and pre["crop"] is None
    assert pre["max_pixels"] == 89_478_485 and pre["exif_orientation"] is True


def tensors_sha256(net) -> str:
    """The digest as docs/sharded-output.md defines it, written out independently."""
    import hashlib

    digest = hashlib.sha256(b"imvec-tensors/1")
    for name, tensor in sorted(net.state_dict().items()):
        if name.split(".")[-1] != "num_batches_tracked":
            flat = tensor.detach().contiguous().reshape(-1)
            digest.update(f"{name}\0{flat.dtype}\0{tuple(tensor.shape)}\0".encode())
            digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_weights_without_a_recorded_source_are_hashed_by_their_tensors(kinds, weights,
                                                                        tmp_path):
    record = read_metadata(run(job(kinds, weights, tmp_path / "f.parquet", size=SIZE)).output)
    assert record["model"]["weights_sha256"] == tensors_sha256(imvec.load(weights).net)
    assert record["model"]["source_sha256"] is None


def test_row_groups_have_a_fixed_size_whatever_the_commits(tmp_path, module, monkeypatch):
    from imvec.extract import sink

    monkeypatch.setattr(sink, "row_group_rows", lambda dim: 16)
    folder = make_folder(tmp_path / "many", 40, size=34)
    result = run(job(folder, module, tmp_path / "f.parquet", size=SIZE, commit_every=7))
    meta = pq.ParquetFile(result.output).metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [16, 16, 8]


def test_pandas_and_duckdb_read_the_result(kinds, weights, tmp_path):
    pd = pytest.importorskip("pandas")
    duckdb = pytest.importorskip("duckdb")
    out = run(job(kinds, weights, tmp_path / "f.parquet", size=SIZE)).output
    ids, features = read_features(out)
    frame = pd.read_parquet(out)
    assert list(frame["id"]) == ids
    np.testing.assert_array_equal(np.stack(frame["feature"].to_numpy()), features)
    rows = duckdb.sql(f"SELECT id, len(feature) AS d FROM '{out}' ORDER BY id").fetchall()
    assert rows == [(i, 256) for i in ids]


def test_npy_format_holds_the_same_vectors(kinds, weights, tmp_path):
    parquet = run(job(kinds, weights, tmp_path / "f.parquet", size=SIZE)).output
    result = run(job(kinds, weights, tmp_path / "g.npy", size=SIZE))
    assert result.output.suffix == ".npy"
    for name in ("g.ids.csv", "g.json", "g.errors.csv"):
        assert (tmp_path / name).is_file(), name
    ids, features = read_features(result.output)
    ref_ids, ref = read_features(parquet)
    assert ids == ref_ids
    np.testing.assert_array_equal(features, ref)
    assert read_metadata(result.output)["output_format"] == "npy"


def test_crop_option(tmp_path, module):
    image = np.random.default_rng(3).integers(0, 256, (72, 72, 3), dtype=np.uint8)
    path = save(image, tmp_path / "in" / "a.png")
    result = run(job(tmp_path / "in", module, tmp_path / "f.parquet", size=SIZE, crop=0.875))
    # 0.875 of 72 keeps the central 64x64 (offset int(9 / 2) = 4), then halves it.
    inner = image[4:68, 4:68].reshape(SIZE, 2, SIZE, 2, 3).astype(np.float64).mean(axis=(1, 3))
    expected = module(inner[None].astype(np.float32) / 255).numpy()
    assert_close("cropped", read_features(result.output)[1], expected)
    assert read_metadata(result.output)["preprocessing"]["crop"] == 0.875
    assert path.exists()


def test_default_size_is_the_cards(tmp_path, module):
    folder = make_folder(tmp_path / "in", 2, size=320)
    result = run(job(folder, module, tmp_path / "f.parquet"))
    assert read_metadata(result.output)["preprocessing"]["size"] == [160, 160]
    for path, vector in zip(sorted(folder.rglob("*.jpg")), read_features(result.output)[1],
                            strict=True):
        assert_close(path.name, vector, reference_features(module, path, 160))


def test_fixed_size_module_refuses_another_size(tmp_path, converted):
    folder = make_folder(tmp_path / "in", 1)
    with pytest.raises(InputError, match="takes 224x224 images only; drop --size 64"):
        run(job(folder, converted("nasnet_mobile_small"), tmp_path / "f.parquet", size=64))


def test_rerun_of_a_finished_job_computes_nothing(tmp_path, module):
    folder = make_folder(tmp_path / "in", 4)
    out = tmp_path / "f.parquet"
    first = run(job(folder, module, out, size=SIZE))
    before = out.read_bytes()
    again = run(job(folder, module, out, size=SIZE))
    assert again.computed == 0 and again.ok == first.ok and out.read_bytes() == before
    assert "already complete" in again.notes[0]
    save(np.zeros((8, 8, 3), np.uint8), folder / "new.png")
    with pytest.raises(ResumeError, match=r"f.parquet is complete but 1 listed images are not "
                                          r"in it; pass --overwrite"):
        run(job(folder, module, out, size=SIZE))
    redone = run(job(folder, module, out, size=SIZE, overwrite=True))
    assert redone.total == 5 and redone.computed == 5


def test_no_bad_images_still_writes_an_empty_errors_file(tmp_path, module):
    folder = make_folder(tmp_path / "in", 3)
    result = run(job(folder, module, tmp_path / "f.parquet", size=SIZE, workers=1))
    assert result.failed == 0 and result.errors.read_text() == (
        "path,reason,file_size,file_mtime_ns,file_hash\n")
    assert "0 failed" in result.summary() and "images/s" in result.summary()


def test_job_options_are_checked_up_front(tmp_path, module):
    with pytest.raises(ValueError, match=r"ends in \.parquet but the format is npy"):
        ExtractJob(("x",), module, tmp_path / "f.parquet", format="npy")
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        ExtractJob(("x",), module, tmp_path / "f.parquet", batch_size=0)
    with pytest.raises(ValueError, match="runner must be one of local, ray; got 'spark'"):
        ExtractJob(("x",), module, tmp_path / "f.parquet", runner="spark")
    with pytest.raises(ValueError, match="engine must be one of auto, fast, .*; got 'spark'"):
        ExtractJob(("x",), module, tmp_path / "f.parquet", engine="spark")
    with pytest.raises(ValueError, match="address names a Ray cluster; use it with runner="):
        ExtractJob(("x",), module, tmp_path / "f.parquet", address="auto")
    folder = make_folder(tmp_path / "in", 1)
    with pytest.raises(InputError, match="at least 32x32; got --size 16"):
        run(job(folder, module, tmp_path / "f.parquet", size=16))


@pytest.mark.heavy
def test_compile_engine_compiles_the_batch_size_once(tmp_path, weights, module, monkeypatch):
    """IMVEC_ENGINE=compile (README): the last, smaller batch reuses the compiled graph."""
    from torch._dynamo.utils import counters

    folder = make_folder(tmp_path / "in", 7)
    reference = run(job(folder, module, tmp_path / "fast.parquet", size=SIZE, batch_size=3))
    monkeypatch.setenv("IMVEC_ENGINE", "compile")
    counters.clear()
    compiled = run(job(folder, weights, tmp_path / "compiled.parquet", size=SIZE,
                       batch_size=3))  # batches of 3, 3, 1
    assert counters["stats"]["unique_graphs"] == 1
    ids, features = read_features(compiled.output)
    assert ids == read_features(reference.output)[0]
    assert_close("compiled", features, read_features(reference.output)[1])


def test_both_scheduling_modes_give_the_same_result(tmp_path, module, monkeypatch):
    import functools

    from imvec.extract import pipeline

    folder = make_folder(tmp_path / "in", 11)
    (folder / "bad.jpg").write_bytes(b"x")
    turns = run(job(folder, module, tmp_path / "turns.parquet", size=SIZE, batch_size=4))
    monkeypatch.setattr(pipeline, "run_local",
                        functools.partial(pipeline.run_local, overlap=True))  # the GPU mode
    overlapped = run(job(folder, module, tmp_path / "overlap.parquet", size=SIZE,
                         batch_size=4))
    ids, features = read_features(overlapped.output)
    assert (ids, overlapped.failed) == (read_features(turns.output)[0], 1)
    np.testing.assert_allclose(features, read_features(turns.output)[1], rtol=1e-5, atol=1e-6)


def test_engine_was_the_old_name_of_runner(tmp_path, module):
    """ExtractJob(engine="local"/"ray") still works, with a DeprecationWarning naming the
    caller's line; engine= now takes the inference engine."""
    for runner in ("local", "ray"):
        with pytest.warns(DeprecationWarning, match=f"use runner='{runner}'") as caught:
            job = ExtractJob(("x",), module, tmp_path / "f.parquet", engine=runner)
        assert (job.runner, job.engine) == (runner, None)
        assert caught[0].filename == __file__
    with pytest.raises(ValueError, match="engine='local' .* contradicts runner='ray'"):
        ExtractJob(("x",), module, tmp_path / "f.parquet", engine="local", runner="ray")
    job = ExtractJob(("x",), module, tmp_path / "f.parquet", runner="ray", engine="faithful")
    assert (job.runner, job.engine) == ("ray", "faithful")


def test_models_loaded_by_name_run_the_fast_engine(weights, monkeypatch):
    from imvec.extract.provenance import load_module

    monkeypatch.delenv("IMVEC_ENGINE", raising=False)
    assert load_module(str(weights)).engine == "fast"  # measured: ORT gains nothing here
    monkeypatch.setenv("IMVEC_ENGINE", "faithful")
    assert load_module(str(weights)).engine == "faithful"
    assert load_module(str(weights), engine="fast").engine == "fast"  # asked beats $IMVEC_ENGINE
    given = imvec.load(weights, engine="faithful")
    monkeypatch.delenv("IMVEC_ENGINE")
    assert load_module(given) is given
    assert load_module(given, engine="auto") is load_module(given, engine="faithful") is given
    with pytest.raises(ValueError, match="runs the 'faithful' engine, not 'fast'"):
        load_module(given, engine="fast")


def test_read_features_is_at_the_top_level():
    assert imvec.read_features is read_features  # as the README's quick start uses it
    assert "read_features" in imvec.__all__
    with pytest.raises(AttributeError, match="no attribute 'read_featurez'"):
        imvec.read_featurez  # noqa: B018


def test_bfloat16_extraction_is_recorded_and_close_to_float32(kinds, weights, tmp_path):
    exact = run(job(kinds, weights, tmp_path / "fp32.parquet", size=SIZE)).output
    rounded = run(job(kinds, weights, tmp_path / "bf16.parquet", size=SIZE,
                      precision="bfloat16")).output
    assert read_metadata(exact)["model"]["precision"] == "float32"
    assert read_metadata(rounded)["model"]["precision"] == "bfloat16"
    ids, reference = read_features(exact)
    ids_bf16, features = read_features(rounded)
    assert ids_bf16 == ids and features.dtype == np.float32
    error = float(np.abs(features - reference).max() / np.abs(reference).max())
    assert 1e-4 < error < 0.02, error  # rounded for real, and only by bfloat16's rounding


def test_a_module_passed_in_keeps_its_precision(kinds, weights, module, tmp_path):
    with pytest.raises(ValueError, match="runs in float32, not bfloat16.*precision='bfloat16'"):
        run(job(kinds, module, tmp_path / "f.parquet", size=SIZE, precision="bfloat16"))
    rounded = imvec.load(weights, precision="bf16")
    out = run(job(kinds, rounded, tmp_path / "g.parquet", size=SIZE, precision="bf16")).output
    assert read_metadata(out)["model"]["precision"] == "bfloat16"
