"""The 1001 ImageNet labels shipped for the TF-Hub classification modules, and top-k."""

from collections import Counter
from pathlib import Path

import pytest
import torch

import imvec
from imvec.labels import imagenet_labels, top_k

ROOT = Path(__file__).parents[1]


def test_imagenet_labels_are_tf_hubs_1001_with_background_first():
    labels = imagenet_labels()
    assert len(labels) == 1001
    assert labels[:3] == ["background", "tench", "goldfish"]
    assert labels[-1] == "toilet tissue"
    # ILSVRC-2012 class index i is label i + 1 (well-known indices of the 1000 classes)
    known = {207: "golden retriever", 281: "tabby", 285: "Egyptian cat", 340: "zebra",
             409: "analog clock", 817: "sports car", 954: "banana", 999: "toilet tissue"}
    for index, name in known.items():
        assert labels[index + 1] == name, index
    repeated = {name for name, n in Counter(labels).items() if n > 1}
    assert repeated == {"crane", "maillot"}  # two synsets share each first lemma
    assert all(label == label.strip() and label for label in labels)


def test_labels_file_is_package_data():
    package_data = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.package-data]")[1]
    assert '"data/imagenet_labels.txt"' in package_data.split("[")[1]
    text = (ROOT / "src/imvec/data/imagenet_labels.txt").read_text(encoding="utf-8")
    assert text.endswith("\n") and text.count("\n") == 1001


def test_classification_modules_name_their_logits():
    classifier = imvec.load("mobilenet_v1_050_160", variant="classification", pretrained=False)
    assert classifier.class_names == imagenet_labels()
    assert imvec.load("mobilenet_v1_050_160", pretrained=False).class_names is None


def test_top_k_is_softmax_ranked():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]])
    probs = torch.softmax(logits, dim=1)
    top = top_k(logits, 2, ["a", "b", "c"])
    assert [name for name, _ in top[0]] == ["b", "c"]
    assert top[0][0][1] == pytest.approx(float(probs[0, 1]))
    assert top[1][0][0] == "a" and top[1][1][1] == pytest.approx(float(probs[1, 1]))
    assert len(top_k(logits, 10)[0]) == 3 and top_k(logits, 1)[1][0][0] == "0"
    with pytest.raises(ValueError, match="2 class names for 3 logits"):
        top_k(logits, 1, ["a", "b"])
