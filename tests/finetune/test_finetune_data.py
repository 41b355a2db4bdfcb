"""Datasets for fine-tuning: folders and tables, the split, the pixels of each example."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imvec.finetune.data import ImageDataset, LabeledImages, read_dataset, stratified_split

TF_REFERENCE = Path(__file__).parents[1] / "data" / "tf_resize_reference.npz"


def _save(path, color=(10, 20, 30), size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


@pytest.fixture
def folder(tmp_path):
    for name, count in (("dog", 3), ("cat", 2)):
        for i in range(count):
            _save(tmp_path / "data" / name / f"{i}.png")
    _save(tmp_path / "data" / "cat" / "nested" / "deep.jpg")
    (tmp_path / "data" / "cat" / "notes.txt").write_text("not an image")
    _save(tmp_path / "data" / "cat" / ".hidden.png")
    return tmp_path / "data"


def test_folder_classes_are_sorted_subfolders(folder):
    data = read_dataset(folder)
    assert data.class_names == ("cat", "dog")
    assert len(data) == 6 and data.labels.count(0) == 3 and data.labels.count(1) == 3
    assert any(p.endswith("deep.jpg") for p in data.paths)
    assert not any("hidden" in p or p.endswith(".txt") for p in data.paths)


@pytest.mark.parametrize("make,match", [
    (lambda root: _save(root / "only" / "a.png"), "at least two"),
    (lambda root: (_save(root / "a" / "1.png"), (root / "empty").mkdir()), "without images"),
    (lambda root: _save(root / "loose.png"), "no sub-folders"),
])
def test_folder_errors_name_the_fix(tmp_path, make, match):
    root = tmp_path / "d"
    root.mkdir()
    make(root)
    with pytest.raises(ValueError, match=match):
        read_dataset(root)


def test_missing_and_unsupported_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="sub-folder per class"):
        read_dataset(tmp_path / "nope")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(ValueError, match=".csv / .parquet"):
        read_dataset(tmp_path / "x.json")


def test_csv_with_relative_paths_and_own_column_names(tmp_path):
    for i in range(4):
        _save(tmp_path / "img" / f"{i}.png")
    rows = "\n".join(f"img/{i}.png,{'ab'[i % 2]}" for i in range(4))
    table = tmp_path / "t.csv"
    table.write_text("file,kind\n" + rows + "\n")
    data = read_dataset(table, path_column="file", label_column="kind")
    assert data.class_names == ("a", "b") and data.labels == (0, 1, 0, 1)
    assert data.paths[0] == str(tmp_path / "img" / "0.png")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['path', 'label'\].*file"):
        read_dataset(table)
    table.write_text("path,label\nimg/0.png,a\n,b\n")
    with pytest.raises(ValueError, match=r"empty path or label in row\(s\) \[2\]"):
        read_dataset(table)


def test_parquet_and_validation_set_with_unknown_class(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    paths = [str(_save(tmp_path / f"{i}.png")) for i in range(3)]
    pq.write_table(pa.table({"path": paths, "label": [1, 2, 1]}), tmp_path / "t.parquet")
    data = read_dataset(tmp_path / "t.parquet")
    assert data.class_names == ("1", "2") and data.labels == (0, 1, 0)
    pq.write_table(pa.table({"path": paths, "label": [1, 3, 1]}), tmp_path / "v.parquet")
    with pytest.raises(ValueError, match=r"training data lacks: \['3'\]"):
        read_dataset(tmp_path / "v.parquet", class_names=data.class_names)


def test_split_is_stratified_disjoint_and_seeded():
    labels = tuple([0] * 20 + [1] * 10 + [2] * 1)
    data = LabeledImages(tuple(str(i) for i in range(31)), labels, ("a", "b", "c"))
    train, val = stratified_split(data, 0.2, seed=1)
    assert sorted(train.paths + val.paths, key=int) == list(data.paths)
    assert [val.labels.count(c) for c in range(3)] == [4, 2, 0]  # a lone example trains
    assert stratified_split(data, 0.2, seed=1) == (train, val)
    assert stratified_split(data, 0.2, seed=2)[1] != val
    assert len(stratified_split(data, 0.0, seed=1)[1]) == 0


def _coordinates(size=200):
    """R = x, G = y: the crop's box can be read back from the output's pixel values."""
    y, x = np.mgrid[0:size, 0:size]
    return Image.fromarray(np.stack([x, y, np.zeros_like(x)], -1).astype(np.uint8))


@pytest.mark.parametrize("fraction", [0.875, 1.0])
def test_evaluation_pixels_are_a_tf_hub_users(tmp_path, fraction):
    """decode_jpeg -> central_crop -> tf.image.resize -> [0, 1], as TensorFlow computed it
    (tests/data/tf_resize_reference.npz); PIL's antialiased resize is ~1/255 away."""
    reference = np.load(TF_REFERENCE)
    path = tmp_path / "photo.jpg"
    path.write_bytes(reference["jpeg_bytes"].tobytes())
    data = LabeledImages((str(path),), (0,), ("a",))
    image, label, _ = ImageDataset(data, (24, 32), augment=False, central_fraction=fraction)[0]
    key = "pipeline_integer_accurate" + ("_crop0.875" if fraction < 1 else "")
    assert image.dtype == torch.float32 and label == 0
    np.testing.assert_allclose(image.numpy(), reference[key], rtol=0, atol=1e-6)


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    paths = tuple(str(tmp_path / f"{i}.png") for i in range(64))
    for path in paths:
        _coordinates(64).save(path)
    data = LabeledImages(paths, (0,) * 64, ("a",))
    dataset = ImageDataset(data, (32, 32), augment=True, seed=5)
    first = dataset[3][0]
    assert torch.equal(ImageDataset(data, (32, 32), augment=True, seed=5)[3][0], first)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[3][0], first)
    flipped = [float(dataset[i][0][..., 0].diff(dim=1).mean()) < 0 for i in range(64)]
    assert 20 <= sum(flipped) <= 44  # horizontal flips about half the time
    plain = ImageDataset(data, (32, 32), augment=False)[0][0]
    assert float(plain[..., 0].diff(dim=1).mean()) > 0
    assert first.dtype == plain.dtype == torch.float32
    assert float(first.min()) >= 0 and float(first.max()) <= 1


def test_undecodable_image_gets_label_minus_one(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    data = LabeledImages((str(bad),), (1,), ("a", "b"))
    image, label, index = ImageDataset(data, (16, 16), augment=True)[0]
    assert label == -1 and index == 0 and image.shape == (16, 16, 3) and not image.any()
    assert image.dtype == torch.float32
