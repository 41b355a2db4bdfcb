"""`imvec extract` on an s3:// prefix (a real S3 server on 127.0.0.1) and on WebDataset
shards: the vectors the module gives for the same pixels, ids from the keys."""

import numpy as np
import pytest
from extract_helpers import make_folder, random_mobilenet, reference_features
from moto_s3 import make_shard, s3_server, upload_tree

import imvec
from imvec.cli import main
from imvec.extract import ExtractJob, read_features, run

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("remote")
    folder = make_folder(root / "photos", 6)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    files = sorted(p for p in folder.rglob("*.jpg") if p.name != "broken.jpg")
    # two shards, three samples each, with a caption beside each image
    for index in range(2):
        make_shard(root / "wds" / f"{index:05d}.tar",
                   [(f"{p.parent.name}-{p.stem}", {"jpg": p.read_bytes(), "txt": b"caption"})
                    for p in files[3 * index:3 * index + 3]])
    weights = random_mobilenet(root / "random.safetensors")
    module = imvec.load(weights)
    expected = {p.relative_to(folder).as_posix(): reference_features(module, p, 32)
                for p in files}
    with s3_server() as fs:
        upload_tree(fs, folder, "photos/set")
        upload_tree(fs, root / "wds", "photos/wds")
        yield root, weights, expected


def check(output, expected, to_key=lambda ident: ident):
    ids, features = read_features(output)
    assert sorted(map(to_key, ids)) == sorted(expected)
    for ident, vector in zip(ids, features, strict=True):
        np.testing.assert_allclose(vector, expected[to_key(ident)], rtol=1e-4, atol=1e-5)


def test_extract_from_an_s3_prefix(setup, tmp_path):
    root, weights, expected = setup
    result = run(ExtractJob(("s3://photos/set",), weights, tmp_path / "s3.parquet", size=32,
                            progress=False, workers=2))
    assert (result.total, result.ok, result.failed) == (7, 6, 1)
    check(result.output, expected)
    assert "s3://photos/set/broken.jpg,not an image" in result.errors.read_text()


@pytest.mark.parametrize("shards", ["{root}/wds/{{00000..00001}}.tar",
                                    "s3://photos/wds/{{00000..00001}}.tar"])
def test_cli_extracts_webdataset_shards(setup, tmp_path, capsys, shards):
    root, weights, expected = setup
    out = tmp_path / "wds.parquet"
    assert main(["extract", shards.format(root=root), "--model", str(weights), "-o", str(out),
                 "--size", "32", "--quiet"]) == 0
    assert "6 images" in capsys.readouterr().out
    ids, _ = read_features(out)
    assert ids[:2] == ["00000/group0-img0000", "00000/group0-img0003"]
    check(out, expected, lambda ident: ident.split("/")[1].replace("-", "/") + ".jpg")


def test_extract_an_s3_prefix_into_a_sharded_output_folder(setup, tmp_path):
    from imvec.extract.shards import read_dataset

    root, weights, expected = setup
    result = run(ExtractJob(("s3://photos/set",), weights, tmp_path / "features", size=32,
                            progress=False, workers=2, shard_size=4))
    assert (result.total, result.ok, result.failed) == (7, 6, 1)
    ids, features = read_dataset(tmp_path / "features")
    assert sorted(ids) == sorted(expected)
    for ident, vector in zip(ids, features, strict=True):
        np.testing.assert_allclose(vector, expected[ident], rtol=1e-4, atol=1e-5)


def test_an_object_rewritten_between_runs_is_computed_again(setup, tmp_path):
    """Fingerprints of URLs come from the store (size, ETag, LastModified): a rewritten
    object is recomputed, its shard only."""
    import s3fs

    root, weights, expected = setup
    fs = s3fs.S3FileSystem()
    upload_tree(fs, root / "photos", "photos/changing")
    out = tmp_path / "features"
    options = {"size": 32, "progress": False, "workers": 2, "shard_size": 4}
    first = run(ExtractJob(("s3://photos/changing",), weights, out, **options))
    assert (first.total, first.computed) == (7, 7)
    assert run(ExtractJob(("s3://photos/changing",), weights, out, **options)).computed == 0
    target, source = "group1/img0001.jpg", "group2/img0002.jpg"
    fs.pipe_file(f"photos/changing/{target}", (root / "photos" / source).read_bytes())
    again = run(ExtractJob(("s3://photos/changing",), weights, out, **options))
    assert again.computed == 4 and any("changed since" in note for note in again.notes)
    ids, features = read_features(out)
    np.testing.assert_allclose(features[ids.index(target)], expected[source], rtol=1e-4,
                               atol=1e-5)


def test_fingerprints_of_urls_and_tar_members_follow_their_content(setup, tmp_path):
    import s3fs

    from imvec.data.remote import member_path
    from imvec.extract.fingerprint import fingerprints

    root, _, _ = setup
    fs = s3fs.S3FileSystem()
    data = (root / "photos" / "group0" / "img0000.jpg").read_bytes()
    fs.pipe_file("photos/fp/a.jpg", data)
    shard = make_shard(tmp_path / "s.tar", [("k", {"jpg": data})])
    fs.put_file(str(shard), "photos/fp/s.tar")
    member = member_path("s3://photos/fp/s.tar", "k.jpg", 512, len(data))
    local = member_path(str(shard), "k.jpg", 512, len(data))
    paths = ["s3://photos/fp/a.jpg", member, local, "s3://photos/fp/missing.jpg"]
    before = fingerprints(paths, verify_inputs=True).rows()
    assert [row[0] for row in before] == [len(data)] * 3 + [-1]
    assert before[1][2] == before[2][2] == before[0][2]  # the member's bytes are the image
    assert fingerprints(paths).rows()[:3] == [row[:2] + (None,) for row in before[:3]]
    changed = data[:-3] + b"\x00" + data[-2:]  # same size, same second, other bytes
    fs.pipe_file("photos/fp/a.jpg", changed)
    make_shard(tmp_path / "s.tar", [("k", {"jpg": changed})])
    fs.put_file(str(shard), "photos/fp/s.tar")
    after = fingerprints(paths).rows()
    assert [row[0] for row in after] == [row[0] for row in before]
    assert all(a[1] != b[1] for a, b in zip(after[:2], before[:2], strict=True))


def test_one_listing_gives_the_fingerprints_that_one_request_each_gives(setup):
    import s3fs

    from imvec.extract.fingerprint import LIST_AT, fingerprints

    root, _, _ = setup
    fs = s3fs.S3FileSystem()
    data = (root / "photos" / "group0" / "img0000.jpg").read_bytes()
    urls = [f"s3://photos/many/{k:02d}.jpg" for k in range(LIST_AT)]
    for k, url in enumerate(urls):
        fs.pipe_file(url[len("s3://"):], data[:100 + k])
    listed = fingerprints([*urls, "s3://photos/many/missing.jpg"]).rows()
    one_each = [fingerprints([url]).rows()[0] for url in urls]
    assert listed[:-1] == one_each and listed[-1][0] == -1
    assert [row[0] for row in listed[:-1]] == [100 + k for k in range(LIST_AT)]
