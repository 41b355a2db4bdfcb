"""Preprocessing: decode -> crop -> resize -> [0, 1], checked with independent arithmetic."""

import numpy as np
import pytest
from PIL import Image
from sample_images import pattern, save

from imvec.data.decode import ImageDecodeError
from imvec.data.preprocess import Preprocessing


def test_halving_a_png_is_the_block_mean_over_255(tmp_path):
    rgb = pattern(64, 96, seed=4)
    path = save(rgb, tmp_path / "a.png")
    out = Preprocessing((32, 48))(path)
    expected = rgb.reshape(32, 2, 48, 2, 3).astype(np.float64).mean(axis=(1, 3)) / 255
    assert out.dtype == np.float32 and out.shape == (32, 48, 3)
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_crop_then_resize(tmp_path):
    rgb = pattern(64, 64, seed=5)
    path = save(rgb, tmp_path / "a.png")
    # 0.875 of 64: offset int(8 / 2) = 4 on each side -> 56x56, then halved to 28x28.
    out = Preprocessing((28, 28), crop=0.875)(path)
    inner = rgb[4:60, 4:60].reshape(28, 2, 28, 2, 3).astype(np.float64).mean(axis=(1, 3))
    np.testing.assert_allclose(out, inner / 255, atol=1e-6)


def test_values_stay_in_unit_range(tmp_path):
    path = save(np.full((9, 7, 3), 255, np.uint8), tmp_path / "white.png")
    out = Preprocessing((31, 5))(path)
    assert out.min() == out.max() == 1.0


def test_describe_and_validation(tmp_path):
    record = Preprocessing((160, 160), 0.875, 1000).describe()
    assert record["size"] == [160, 160] and record["crop"] == 0.875
    assert record["max_pixels"] == 1000 and "half-pixel" in record["resize"]
    with pytest.raises(ValueError, match="crop must be"):
        Preprocessing((8, 8), crop=0)
    with pytest.raises(ValueError, match="max_pixels"):
        Preprocessing((8, 8), max_pixels=0)
    Image.new("RGB", (50, 50)).save(tmp_path / "b.png")
    with pytest.raises(ImageDecodeError, match="exceeds the limit of 100"):
        Preprocessing((8, 8), max_pixels=100)(tmp_path / "b.png")


def test_a_recorded_preprocessing_is_rebuilt_exactly():
    for pre in (Preprocessing((40, 30), 0.875, 1000, accept_truncated=True),
                Preprocessing((8, 8))):
        assert Preprocessing.from_record(pre.describe()) == pre


def test_preprocess_takes_the_size_of_a_handle_card_or_module(tmp_path):
    import imvec
    from imvec.registry import find_card

    path = save(pattern(40, 60, seed=6), tmp_path / "a.png")
    by_name = imvec.preprocess(path, "nasnet_mobile")  # nothing downloaded: only the size
    assert by_name.shape == (224, 224, 3) and by_name.dtype == np.float32
    assert np.array_equal(imvec.preprocess(path, find_card("nasnet_mobile")), by_name)
    assert np.array_equal(imvec.preprocess(path, 224), by_name)
    module = imvec.load("mobilenet_v1_050_160", pretrained=False)
    assert imvec.preprocess(path, module, size=96).shape == (96, 96, 3)
    assert imvec.preprocess(path, (20, 30), crop=0.5).shape == (20, 30, 3)
    assert imvec.preprocess(np.stack([pattern(40, 60)] * 2), 8).shape == (2, 8, 8, 3)


@pytest.mark.parametrize("image,model,options,match", [
    (np.zeros((8, 8, 3), np.float32), 8, {}, r"uint8 RGB \[height, width, 3\]; got float32"),
    (np.zeros((8, 8), np.uint8), 8, {}, r"got uint8 \[8, 8\]"),
    (np.zeros((8, 8, 3), np.uint8), 8, {"size": 8}, "give the size once"),
    (np.zeros((8, 8, 3), np.uint8), "nasnet_mobile", {"size": 96}, "takes 224x224 images only"),
    (np.zeros((8, 8, 3), np.uint8), "mobilenet_v1_050_160", {"size": 16}, "at least 32x32"),
    (np.zeros((8, 8, 3), np.uint8), 2.5, {}, "got float"),
    (7, 8, {}, "got int"),
    ([], 8, {}, "empty list"),
])
def test_preprocess_refuses_bad_input_saying_what_to_do(image, model, options, match):
    import imvec
    from imvec.errors import InputError

    with pytest.raises(InputError, match=match):
        imvec.preprocess(image, model, **options)
