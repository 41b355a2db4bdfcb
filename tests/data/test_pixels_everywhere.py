"""One image pipeline: the same image gives the same pixels through every command.

imvec.preprocess (path, PIL image, array), the extract decode pool, imvec predict,
fine-tuning's evaluation crops and imvec neighbors' queries must feed a module identical
arrays (np.array_equal), and imvec.preprocess must be TensorFlow's pipeline
(tf_resize_reference.npz), so all of them are.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sample_images import pattern, save_oriented

import imvec
from imvec.data.preprocess import Preprocessing
from imvec.data.sources import list_images
from imvec.engines.scaling import to_network_range
from imvec.extract import ExtractJob, neighbors, run
from imvec.extract.pool import DecodePool
from imvec.extract.provenance import preprocessing_for
from imvec.finetune.data import ImageDataset, LabeledImages
from imvec.finetune.predict import predict
from imvec.module import Module

REFERENCE = np.load(Path(__file__).with_name("tf_resize_reference.npz"))
SIZE = (24, 32)  # the size of TensorFlow's reference pipeline
UPRIGHT = pattern(75, 50, seed=9)  # a portrait photo, stored turned (EXIF orientation 6)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    jpeg = folder / "photo.jpg"  # a real JPEG, 120x90, the one TF decoded
    jpeg.write_bytes(REFERENCE["jpeg_bytes"].tobytes())
    png = save_oriented(UPRIGHT, folder / "turned.png", 6)
    return {"jpeg": jpeg, "png": png}


class Inputs:
    """Records what a Module is called with (the pixels a command feeds the network)."""

    def __init__(self, monkeypatch, outputs: int) -> None:
        self.seen: list[np.ndarray] = []
        record = self

        def call(module, images, *args, **kwargs):
            record.seen.append(np.asarray(images).copy())
            return torch.zeros(len(images), outputs)

        monkeypatch.setattr(Module, "__call__", call)


def test_the_png_is_stored_turned_and_read_upright(images):
    with Image.open(images["png"]) as image:
        assert image.getexif()[0x0112] == 6 and image.size == (75, 50)
    assert np.array_equal(imvec.preprocess(images["png"], SIZE),
                          imvec.preprocess(UPRIGHT, SIZE))


@pytest.mark.parametrize("crop", [None, 0.875])
def test_preprocess_is_tensorflows_pipeline(images, crop):
    """decode_jpeg(dct_method="INTEGER_ACCURATE") -> convert_image_dtype -> central_crop ->
    tf.image.resize, as TensorFlow itself computed it."""
    key = "pipeline_integer_accurate" + ("_crop0.875" if crop else "")
    ours = imvec.preprocess(images["jpeg"], SIZE, crop=crop)
    assert ours.dtype == np.float32 and ours.shape == (*SIZE, 3)
    np.testing.assert_allclose(ours, REFERENCE[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("crop", [None, 0.875])
@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_every_command_gives_identical_pixels(images, kind, crop, monkeypatch):
    path = images[kind]
    expected = imvec.preprocess(path, SIZE, crop=crop)
    fraction = crop or 1.0  # predict and fine-tuning always crop; 1.0 keeps everything

    # imvec.preprocess on a PIL image, an array and a batch
    with Image.open(path) as image:
        assert np.array_equal(imvec.preprocess(image, SIZE, crop=crop), expected)
    upright = np.asarray(Image.open(path).convert("RGB")) if kind == "jpeg" else UPRIGHT
    assert np.array_equal(imvec.preprocess(upright, SIZE, crop=crop), expected)
    assert np.array_equal(imvec.preprocess([path, path], SIZE, crop=crop)[1], expected)

    # imvec extract: the decode pool's workers, scaled to the network's range as it scales
    with DecodePool(Preprocessing(SIZE, crop), 1, batch_size=1, chunk=1) as pool:
        (batch,) = list(pool.batches(list_images([path])))
        assert batch.errors == [None]
        assert np.array_equal(batch.images[0], to_network_range(expected))

    # fine-tuning's evaluation crops (head-mode features and validation)
    data = LabeledImages((str(path),), (0,), ("a",))
    pixels = ImageDataset(data, SIZE, augment=False, central_fraction=fraction)[0][0]
    assert np.array_equal(pixels.numpy(), expected)

    # imvec predict
    inputs = Inputs(monkeypatch, 1001)
    module = imvec.load("mobilenet_v1_050_160", variant="classification", pretrained=False)
    (prediction,) = predict([path], module, k=1, central_fraction=fraction, image_size=SIZE)
    assert prediction.error is None
    assert np.array_equal(inputs.seen[0][0], expected)


@pytest.mark.parametrize("crop", [None, 0.875])
def test_extract_options_make_the_same_preprocessing(images, crop):
    """`imvec extract --crop ... --size 48` builds the Preprocessing that imvec.preprocess
    builds from the same options."""
    module = imvec.load("mobilenet_v1_050_160", pretrained=False)
    extract = preprocessing_for(module, 48, crop, 100_000)
    for path in images.values():
        assert np.array_equal(extract(path), imvec.preprocess(path, module, size=48, crop=crop,
                                                              max_pixels=100_000))


def test_neighbors_queries_are_embedded_as_the_index_was(images, tmp_path, monkeypatch):
    weights = tmp_path / "random.safetensors"
    from imvec.weights.convert import FORMAT, save_converted

    net = imvec.create_model("mobilenet_v1_050_160", depth_multiplier=0.25)
    save_converted(net, weights, {"format": FORMAT, "arch": "mobilenet_v1_050_160",
                                  "network": "mobilenet_v1", "num_classes": "",
                                  "hparams": '{"depth_multiplier": 0.25}',
                                  "source": "random (tests)"})
    folder = images["jpeg"].parent
    index = run(ExtractJob((str(folder),), weights, tmp_path / "f.parquet", size=40,
                           crop=0.875, progress=False, workers=1)).output
    inputs = Inputs(monkeypatch, 256)
    neighbors([images["jpeg"], images["png"]], index, k=1)
    (queries,) = inputs.seen
    for query, path in zip(queries, (images["jpeg"], images["png"]), strict=True):
        assert np.array_equal(query, imvec.preprocess(path, 40, crop=0.875))
