"""Crop and resize against TensorFlow's own outputs (tf_resize_reference.npz)."""

from pathlib import Path

import numpy as np
import pytest

from imvec.data.resize import central_crop, resize_bilinear

REFERENCE = np.load(Path(__file__).with_name("tf_resize_reference.npz"))
RESIZES = sorted(k for k in REFERENCE.files if k.startswith("resize_"))
CROPS = sorted(k for k in REFERENCE.files if k.startswith("crop"))


@pytest.mark.parametrize("key", RESIZES)
def test_resize_equals_tf_image_resize(key):
    shape, size = key.removeprefix("resize_").split("_to_")
    image = REFERENCE[f"image_{shape}"]
    height, width = map(int, size.split("x"))
    ours = resize_bilinear(image, (height, width))
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, REFERENCE[key], rtol=0, atol=1e-4, err_msg=key)


@pytest.mark.parametrize("key", CROPS)
def test_central_crop_equals_tf_central_crop(key):
    image = REFERENCE[f"image_{key.split('_')[1]}"]
    np.testing.assert_array_equal(central_crop(image, 0.875), REFERENCE[key])


def test_halving_is_the_mean_of_each_2x2_block():
    # Half-pixel centers put each output pixel exactly between four inputs.
    image = np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    expected = image.reshape(20, 2, 30, 2, 3).astype(np.float64).mean(axis=(1, 3))
    np.testing.assert_allclose(resize_bilinear(image, (20, 30)), expected, atol=1e-4)


def test_same_size_is_identity_and_cost_ignores_input_size():
    image = np.random.default_rng(1).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    np.testing.assert_array_equal(resize_bilinear(image, (17, 23)), image.astype(np.float32))
    wide = np.zeros((5, 4000, 3), np.uint8)
    wide[:, 2000:] = 255
    out = resize_bilinear(wide, (5, 4))
    assert out.shape == (5, 4, 3) and out[:, :2].max() == 0 and out[:, 2:].min() == 255


def test_bad_crop_and_shape():
    with pytest.raises(ValueError, match="crop fraction must be in"):
        central_crop(np.zeros((4, 4, 3)), 1.5)
    with pytest.raises(ValueError, match=r"\[H, W, C\]"):
        resize_bilinear(np.zeros((4, 4)), (2, 2))


@pytest.mark.parametrize("crop", [None, 0.875])
def test_whole_preprocessing_equals_a_tf_hub_users_pipeline(crop):
    from imvec.data.preprocess import Preprocessing

    jpeg = REFERENCE["jpeg_bytes"].tobytes()
    suffix = "_crop0.875" if crop else ""
    ours = Preprocessing((24, 32), crop=crop)(jpeg)
    # Bit for bit the pixels of tf.io.decode_jpeg(dct_method="INTEGER_ACCURATE") ...
    np.testing.assert_allclose(ours, REFERENCE[f"pipeline_integer_accurate{suffix}"], atol=1e-6)
    # ... and close to TF's default fast IDCT, which rounds differently.
    default = REFERENCE[f"pipeline_default{suffix}"]
    assert 1e-4 < np.abs(ours - default).max() < 4 / 255
