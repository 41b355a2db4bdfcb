"""list_images: folders, globs, path lists, tables; stable ids; clear errors."""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from imvec.data.sources import Item, list_images
from imvec.errors import InputError


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "photos"
    for name in ["b.jpg", "a.PNG", "sub/c.jpeg", "sub/deeper/d.webp", "notes.txt",
                 ".hidden.jpg", ".cache/e.jpg", "sub/f.JPG"]:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    return root


def ids(items):
    return [item.id for item in items]


def test_folder_is_recursive_sorted_and_skips_hidden_and_non_images(tree):
    items = list_images([tree])
    assert ids(items) == ["a.PNG", "b.jpg", "sub/c.jpeg", "sub/deeper/d.webp", "sub/f.JPG"]
    assert items[2] == Item("sub/c.jpeg", str(tree / "sub" / "c.jpeg"))


def test_ids_do_not_depend_on_how_the_root_is_spelled(tree, monkeypatch):
    monkeypatch.chdir(tree.parent)
    assert ids(list_images(["photos"])) == ids(list_images([str(tree.resolve()) + "/"]))


def test_glob_ids_are_relative_to_its_fixed_part(tree):
    items = list_images([str(tree / "sub" / "**" / "*.*")])
    assert ids(items) == ["c.jpeg", "deeper/d.webp", "f.JPG"]
    with pytest.raises(InputError, match="no file matches"):
        list_images([str(tree / "*.gif")])


def test_path_list_is_relative_to_its_folder_and_keeps_its_order(tree):
    listing = tree / "list.txt"
    listing.write_text(f"sub/c.jpeg\n\nb.jpg\n{tree / 'a.PNG'}\n")
    items = list_images([listing])
    assert ids(items) == ["sub/c.jpeg", "b.jpg", "a.PNG"]
    assert items[0].path == str(tree / "sub" / "c.jpeg")


def test_tables_with_path_and_id_columns(tree):
    pq.write_table(pa.table({"file": ["b.jpg", "sub/f.JPG"], "label": [1, 2]}),
                   tree / "t.parquet")
    assert ids(list_images([tree / "t.parquet"], path_column="file")) == ["b.jpg", "sub/f.JPG"]
    (tree / "t.csv").write_text("id,path\nfirst,b.jpg\nsecond,a.PNG\n")
    items = list_images([tree / "t.csv"])
    assert items == [Item("first", str(tree / "b.jpg")), Item("second", str(tree / "a.PNG"))]
    with pytest.raises(InputError, match="no column 'path'; its columns are file, label.*"
                                         "--path-column"):
        list_images([tree / "t.parquet"])


def test_single_file_and_several_inputs(tree):
    items = list_images([tree / "b.jpg", tree / "sub"])
    assert ids(items) == ["b.jpg", "c.jpeg", "deeper/d.webp", "f.JPG"]


def test_same_file_twice_is_kept_once_but_clashing_ids_are_an_error(tree):
    assert len(list_images([tree, tree])) == 5
    other = tree.parent / "other"
    other.mkdir()
    (other / "b.jpg").write_bytes(b"y")
    with pytest.raises(InputError, match=r"1 ids name two different files: b\.jpg .*common "
                                         "parent"):
        list_images([tree, other])


def test_missing_and_empty_inputs(tmp_path):
    with pytest.raises(InputError, match="nope: no such file or folder"):
        list_images([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: no images found"):
        list_images([tmp_path / "empty"])
    with pytest.raises(InputError, match="no inputs"):
        list_images([])


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root reads any folder")
def test_unreadable_folder_is_a_clear_error(tree):
    locked = tree / "sub"
    locked.chmod(0)
    try:
        with pytest.raises(InputError, match="cannot list .*permission"):
            list_images([tree])
    finally:
        locked.chmod(0o755)


def test_unlistable_folder_is_a_clear_error_even_as_root(tree, monkeypatch):
    real = os.scandir

    def scandir(path):
        if os.fspath(path).endswith("sub"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(InputError, match=r"cannot list .*sub: Permission denied; fix its "
                                         "permissions"):
        list_images([tree])
