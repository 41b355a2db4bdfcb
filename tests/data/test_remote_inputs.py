"""Inputs where big collections live: S3 prefixes (a real S3 server on 127.0.0.1), fsspec
URLs, WebDataset tar shards and brace patterns, img2dataset folders; ids and bytes."""

import os
import tarfile

import pytest
from moto_s3 import make_shard, s3_server, upload_tree

from imvec.data.decode import ImageDecodeError
from imvec.data.remote import image_source, parse_member, sorted_walk
from imvec.data.sources import Item, expand_braces, list_images
from imvec.errors import InputError

pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

# (key, {extension: bytes}) of two shards: captions and metadata beside the images, a
# segmentation mask (not the sample's image), a sample without an image, a name long
# enough to need a pax header, and a key with two images (the first one counts).
LONG = "deep/" + "n" * 120
SHARDS = {
    "00000": [("000000000", {"jpg": b"jpg-0", "txt": b"a cat", "json": b"{}"}),
              ("000000001", {"json": b"{}"}),
              ("000000002", {"png": b"png-2", "seg.png": b"mask"}),
              (LONG, {"webp": b"webp-long"})],
    "00001": [("000010000", {"jpeg": b"jpeg-1", "txt": b"a dog"}),
              ("000010001", {"jpg": b"first", "png": b"second"})],
}
SHARD_IDS = ["00000/000000000", "00000/000000002", f"00000/{LONG}", "00001/000010000",
             "00001/000010001"]
SHARD_BYTES = [b"jpg-0", b"png-2", b"webp-long", b"jpeg-1", b"first"]


@pytest.fixture(scope="module")
def s3():
    with s3_server() as fs:
        yield fs


@pytest.fixture
def tree(tmp_path):
    """Names whose sorted order differs from a folder-by-folder walk's."""
    root = tmp_path / "data"
    for name in ["a.jpg", "a/b.jpg", "a-b.jpg", "a0.jpg", "b/c/d.png", ".hidden.jpg",
                 "notes.txt", "Z.JPG"]:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(name.encode())
    return root


def shards(folder):
    return [make_shard(folder / f"{stem}.tar", samples) for stem, samples in SHARDS.items()]


def content(path):
    """An item's bytes, as the decoder gets them (a local file's path: read it)."""
    source = image_source(path)
    return source if isinstance(source, bytes) else open(source, "rb").read()


def listing(items):
    return [(item.id, content(item.path)) for item in items]


def test_streamed_walk_gives_the_order_of_sorting_everything(tree):
    everything = sorted(os.path.relpath(os.path.join(d, f), tree).replace(os.sep, "/")
                        for d, _, files in os.walk(tree) for f in files)

    def lister(folder):
        return [(e.name, e.is_dir()) for e in os.scandir(folder)]

    assert list(sorted_walk(lister, str(tree), os.path.join)) == [
        p for p in everything if not p.startswith(".")]


def test_s3_prefix_lists_and_reads_like_the_local_folder(s3, tree):
    upload_tree(s3, tree, "photos/walk")
    local = list_images([tree])
    remote = list_images(["s3://photos/walk"])
    assert [i.id for i in remote] == [i.id for i in local] == [
        "Z.JPG", "a-b.jpg", "a.jpg", "a/b.jpg", "a0.jpg", "b/c/d.png"]
    assert remote[0] == Item("Z.JPG", "s3://photos/walk/Z.JPG")
    assert [image_source(i.path) for i in remote] == [(tree / i.id).read_bytes()
                                                      for i in local]
    assert list_images(["s3://photos/walk/"]) == remote


def test_s3_globs_and_tables(s3, tree):
    upload_tree(s3, tree, "photos/glob")
    assert [i.id for i in list_images(["s3://photos/glob/*.jpg"])] == [
        "a-b.jpg", "a.jpg", "a0.jpg"]
    assert [i.id for i in list_images(["s3://photos/glob/**/*.*g"])] == [
        "a-b.jpg", "a.jpg", "a/b.jpg", "a0.jpg", "b/c/d.png"]
    s3.pipe_file("photos/glob/list.csv", b"path\na/b.jpg\ns3://photos/glob/Z.JPG\n")
    items = list_images(["s3://photos/glob/list.csv"])
    assert items == [Item("a/b.jpg", "s3://photos/glob/a/b.jpg"),
                     Item("s3://photos/glob/Z.JPG", "s3://photos/glob/Z.JPG")]
    assert image_source(items[0].path) == b"a/b.jpg"


def test_a_tar_shard_gives_one_image_per_sample_with_its_key(tmp_path):
    first, _ = shards(tmp_path)
    items = list_images([first])
    assert [i.id for i in items] == SHARD_IDS[:3]
    assert [image_source(i.path) for i in items] == SHARD_BYTES[:3]
    archive, member, offset, size = parse_member(items[2].path)
    assert (archive, member, size) == (str(first), f"{LONG}.webp", len(b"webp-long"))
    with tarfile.open(first) as tar:  # the offset is where the standard library finds it
        assert tar.getmember(member).offset_data == offset


def test_brace_patterns_and_globs_of_shards_local_and_on_s3(s3, tmp_path):
    shards(tmp_path / "wds")
    upload_tree(s3, tmp_path / "wds", "photos/wds")
    for pattern in [f"{tmp_path}/wds/{{00000..00001}}.tar", f"{tmp_path}/wds/*.tar",
                    "s3://photos/wds/{00000..00001}.tar", "s3://photos/wds/0000*.tar",
                    "s3://photos/wds/00000.tar"]:
        expected = SHARD_IDS if "00000.tar" not in pattern else SHARD_IDS[:3]
        assert listing(list_images([pattern])) == list(
            zip(expected, SHARD_BYTES, strict=False)), pattern


def test_brace_expansion():
    assert expand_braces("s3://b/{000..002}.tar") == [f"s3://b/{i:03d}.tar" for i in range(3)]
    assert expand_braces("{8..10}-{a,b}") == ["8-a", "8-b", "9-a", "9-b", "10-a", "10-b"]
    assert expand_braces("x{2..0}") == ["x2", "x1", "x0"]
    assert expand_braces("plain{x}") == ["plain{x}"]


def img2dataset_folder(root, files_format):
    """img2dataset's layout: per shard a .tar (or a folder of files), .parquet, _stats.json."""
    for stem, samples in SHARDS.items():
        if files_format:
            for key, members in samples:
                for ext, data in members.items():
                    (root / stem / f"{key}.{ext}").parent.mkdir(parents=True, exist_ok=True)
                    (root / stem / f"{key}.{ext}").write_bytes(data)
        else:
            make_shard(root / f"{stem}.tar", samples)
        (root / f"{stem}.parquet").write_bytes(b"PAR1")
        (root / f"{stem}_stats.json").write_text("{}")
    return root


@pytest.mark.parametrize("files_format", [False, True], ids=["webdataset", "files"])
def test_img2dataset_folders_give_shard_and_key_ids(s3, tmp_path, files_format):
    folder = img2dataset_folder(tmp_path / "out", files_format)
    expected = list(zip(SHARD_IDS, SHARD_BYTES, strict=True))
    assert listing(list_images([folder])) == expected
    prefix = f"photos/i2d-{files_format}"
    upload_tree(s3, folder, prefix)
    assert listing(list_images([f"s3://{prefix}"])) == expected


def test_img2dataset_parquet_format_is_refused_with_the_way_out(tmp_path):
    (tmp_path / "00000.parquet").write_bytes(b"PAR1")
    (tmp_path / "00000_stats.json").write_text("{}")
    with pytest.raises(InputError, match="'webdataset' and 'files' formats"):
        list_images([tmp_path])


def test_file_urls_are_local_paths(tree):
    assert list_images([f"file://{tree}"]) == list_images([tree])
    assert image_source(f"file://{tree}/a.jpg") == f"{tree}/a.jpg"


def test_clear_errors(s3, tmp_path):
    with pytest.raises(InputError, match="s3://photos/nothing: no such file or folder"):
        list_images(["s3://photos/nothing"])
    with pytest.raises(InputError, match="nosuch://x: .*fsspec"):
        list_images(["nosuch://x"])
    (tmp_path / "a.tar.gz").write_bytes(b"")
    with pytest.raises(InputError, match="compressed tar shard .*decompress"):
        list_images([tmp_path / "a.tar.gz"])
    shards(tmp_path)
    with pytest.raises(InputError, match=r"00002\.tar: no such file \(from the pattern"):
        list_images([f"{tmp_path}/{{00000..00002}}.tar"])
    (tmp_path / "bad.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(InputError, match="bad.tar: cannot read this tar shard"):
        list_images([tmp_path / "bad.tar"])


def test_unreadable_images_are_decode_errors_not_crashes(s3, tmp_path):
    with pytest.raises(ImageDecodeError, match="file not found: s3://photos/missing.jpg"):
        image_source("s3://photos/missing.jpg")
    first = shards(tmp_path)[0]
    items = list_images([first])
    first.write_bytes(first.read_bytes()[:1024])  # rewritten after listing
    with pytest.raises(ImageDecodeError, match="tar shard ends early.*--relist"):
        image_source(items[-1].path)


def test_shards_are_listed_several_at_once_and_kept_in_order():
    import threading

    from imvec.data.webdataset import in_order

    together = threading.Barrier(4, timeout=10)  # broken unless four tasks run at once

    def task(n):
        together.wait()
        return [n, n]

    tasks = [[-1], *(lambda n=n: task(n) for n in range(4)), [9]]
    assert list(in_order(tasks, ahead=4)) == [-1, 0, 0, 1, 1, 2, 2, 3, 3, 9]
