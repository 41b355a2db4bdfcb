"""`imvec extract ... -o s3://bucket/features/` (a real S3 server on 127.0.0.1): the sharded
output written to an object store, read back, and resumed there as in a local folder."""

import json
import subprocess
import sys

import numpy as np
import pytest
from extract_helpers import RAY_TOKEN, make_folder, random_mobilenet, reference_features
from moto_s3 import s3_server, upload_tree

import imvec
from imvec.cli import main
from imvec.errors import ImvecError
from imvec.extract import ExtractJob, read_features, read_metadata, run

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

OPTIONS = {"size": 32, "progress": False, "workers": 2, "shard_size": 3}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """7 images (one broken) at s3://photos/set, the same job written to a local folder,
    and the vectors the module gives for each image (independent of imvec.data)."""
    root = tmp_path_factory.mktemp("remote-out")
    folder = make_folder(root / "photos", 6)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    weights = random_mobilenet(root / "random.safetensors")
    module = imvec.load(weights)
    expected = {p.relative_to(folder).as_posix(): reference_features(module, p, 32)
                for p in sorted(folder.rglob("img*.jpg"))}
    with s3_server() as fs:
        fs.mkdir("out")
        upload_tree(fs, folder, "photos/set")
        local = run(ExtractJob(("s3://photos/set",), weights, root / "local", **OPTIONS))
        assert (local.total, local.ok, local.failed) == (7, 6, 1)
        yield fs, root, weights, expected, read_features(local.output)


def same_vectors(result, reference):
    ids, features = result
    assert ids == reference[0]
    np.testing.assert_array_equal(features, reference[1])


def test_an_output_folder_at_a_url_reads_back_as_the_local_one(store, tmp_path, monkeypatch):
    fs, root, weights, expected, local = store
    monkeypatch.chdir(tmp_path)  # Path("s3://out/f") would be a local folder "s3:/out/f"
    result = run(ExtractJob(("s3://photos/set",), weights, "s3://out/features/", **OPTIONS))
    assert (result.total, result.ok, result.failed, result.computed) == (7, 6, 1, 7)
    assert (str(result.output), str(result.errors)) == ("s3://out/features",
                                                        "s3://out/features/_errors.csv")
    assert list(tmp_path.iterdir()) == []
    assert sorted(fs.ls("out/features", detail=False)) == [
        f"out/features/{name}" for name in ["_done", "_errors.csv", "_imvec.json",
                                            "_manifest", "shard-00000.parquet",
                                            "shard-00001.parquet", "shard-00002.parquet"]]
    assert "s3://photos/set/broken.jpg,not an image" in fs.cat_file(
        "out/features/_errors.csv").decode()
    ids, features = read_features("s3://out/features")
    same_vectors((ids, features), local)
    assert sorted(ids) == sorted(expected)
    for ident, vector in zip(ids, features, strict=True):
        np.testing.assert_allclose(vector, expected[ident], rtol=1e-4, atol=1e-5)
    assert read_metadata("s3://out/features/") == read_metadata(root / "local")


def test_pyarrow_dataset_over_s3fs_reads_the_folder_as_one_table(store, tmp_path):
    """What a user's reader sees: the shards, the `_` names skipped. In a process without
    torch: pyarrow reading through a Python file system aborts torch processes at exit."""
    fs, _, weights, expected, local = store
    run(ExtractJob(("s3://photos/set",), weights, "s3://out/dataset", **OPTIONS))
    script = ("import json, sys, pyarrow.dataset as ds, s3fs\n"
              "table = ds.dataset('out/dataset', filesystem=s3fs.S3FileSystem(),"
              " format='parquet').to_table(columns=['id', 'feature'])\n"
              "json.dump({'id': table.column('id').to_pylist(),"
              " 'feature': table.column('feature').to_pylist()}, sys.stdout)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    table = json.loads(done.stdout)
    rows = dict(zip(table["id"], table["feature"], strict=True))
    assert sorted(rows) == sorted(local[0])
    for ident, vector in zip(*local, strict=True):
        np.testing.assert_array_equal(np.float32(rows[ident]), vector)


def test_a_lost_marker_recomputes_that_shard_only(store):
    """A shard whose done marker is missing (its writer killed between the shard and the
    marker) is computed again, the others not; the result is the uninterrupted one's."""
    fs, _, weights, _, local = store
    job = ExtractJob(("s3://photos/set",), weights, "s3://out/resume", **OPTIONS)
    assert run(job).computed == 7
    fs.rm("out/resume/_done/00001.json")
    # listing order: broken.jpg first, so shard 1 holds the 3rd to 5th images that are ok
    assert read_features("s3://out/resume")[0] == local[0][:2] + local[0][5:]
    again = run(job)
    assert (again.total, again.ok, again.failed, again.computed) == (7, 6, 1, 3)
    assert again.resumed
    same_vectors(read_features("s3://out/resume"), local)
    finished = run(job)
    assert finished.computed == 0
    assert "already complete: nothing to compute" in finished.notes


def test_a_changed_input_recomputes_its_shard_at_the_url(store):
    fs, root, weights, expected, _ = store
    upload_tree(fs, root / "photos", "photos/changing")
    job = ExtractJob(("s3://photos/changing",), weights, "s3://out/changing", **OPTIONS)
    assert run(job).computed == 7
    target, source = "group1/img0001.jpg", "group2/img0002.jpg"
    fs.pipe_file(f"photos/changing/{target}", (root / "photos" / source).read_bytes())
    again = run(job)
    assert again.computed == 3 and any("changed since" in note for note in again.notes)
    ids, features = read_features("s3://out/changing")
    np.testing.assert_allclose(features[ids.index(target)], expected[source], rtol=1e-4,
                               atol=1e-5)


def test_relist_adds_new_objects_as_a_new_shard(store, tmp_path):
    fs, root, weights, expected, _ = store
    upload_tree(fs, root / "photos", "photos/grow")
    job = ExtractJob(("s3://photos/grow",), weights, "s3://out/grow", **OPTIONS)
    assert run(job).computed == 7
    fs.pipe_file("photos/grow/new.jpg", (root / "photos" / "group0" / "img0000.jpg")
                 .read_bytes())
    added = run(ExtractJob(("s3://photos/grow",), weights, "s3://out/grow", relist=True,
                           **OPTIONS))
    assert (added.total, added.ok, added.computed) == (8, 7, 1)
    ids, features = read_features("s3://out/grow")
    assert ids[-1] == "new.jpg"  # a new shard after the others
    np.testing.assert_allclose(features[-1], expected["group0/img0000.jpg"], rtol=1e-4,
                               atol=1e-5)


def test_overwrite_and_other_weights_at_a_url(store, tmp_path):
    fs, _, weights, _, local = store
    job = ExtractJob(("s3://photos/set",), weights, "s3://out/over", **OPTIONS)
    run(job)
    fs.pipe_file("out/over/_done/00007.json", b"{}")  # a stray object --overwrite clears
    other = random_mobilenet(tmp_path / "other.safetensors", seed=1)
    with pytest.raises(ImvecError, match="made differently"):
        run(ExtractJob(("s3://photos/set",), other, "s3://out/over", **OPTIONS))
    redone = run(ExtractJob(("s3://photos/set",), weights, "s3://out/over", overwrite=True,
                            **OPTIONS))
    assert redone.computed == 7 and not fs.exists("out/over/_done/00007.json")
    same_vectors(read_features("s3://out/over"), local)


def test_a_url_some_process_here_writes_is_refused(store):
    from imvec.extract.folder import Folder

    _, _, weights, _, _ = store
    with Folder("s3://out/locked/").lock(), pytest.raises(ImvecError,
                                                         match="another imvec process"):
        run(ExtractJob(("s3://photos/set",), weights, "s3://out/locked", **OPTIONS))


def test_a_url_that_holds_other_things_is_refused(store):
    fs, _, weights, _, _ = store
    fs.pipe_file("out/theirs/notes.txt", b"mine")
    with pytest.raises(ImvecError, match="not an imvec output folder"):
        run(ExtractJob(("s3://photos/set",), weights, "s3://out/theirs", **OPTIONS))
    assert fs.cat_file("out/theirs/notes.txt") == b"mine"


def test_cli_writes_to_a_url(store, capsys):
    _, _, weights, _, local = store
    assert main(["extract", "s3://photos/set", "--model", str(weights), "-o",
                 "s3://out/cli/", "--size", "32", "--shard-size", "3", "--quiet"]) == 0
    assert "7 images -> s3://out/cli (6 ok, 1 failed" in capsys.readouterr().out
    same_vectors(read_features("s3://out/cli/"), local)
    with pytest.raises(ImvecError, match="imvec reads output folders at URLs"):
        read_features("s3://out/cli/shard-00000.parquet")


def test_ray_actors_write_their_shards_to_the_url(store, monkeypatch):
    """Each actor writes its shards and markers to the store itself; a lost marker is
    recomputed on Ray too. Last in the module: Ray's workers take the S3 settings the
    server fixture put in the environment when Ray starts."""
    ray = pytest.importorskip("ray")
    fs, root, weights, _, local = store
    monkeypatch.setenv("RAY_AUTH_TOKEN", RAY_TOKEN)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        job = ExtractJob(("s3://photos/set",), weights, "s3://out/ray", runner="ray",
                         **OPTIONS)
        result = run(job)
        assert (result.total, result.ok, result.failed, result.computed) == (7, 6, 1, 7)
        fs.rm("out/ray/_done/00002.json")
        assert run(job).computed == 1
    finally:
        ray.shutdown()
    ids, features = read_features("s3://out/ray")
    assert ids == local[0]
    np.testing.assert_allclose(features, local[1], rtol=1e-5, atol=1e-6)
    assert fs.cat_file("out/ray/_errors.csv") == (root / "local" / "_errors.csv").read_bytes()
