"""decode_rgb: OpenCV and Pillow give the same pixels; EXIF, modes, limits, bad files."""

import numpy as np
import pytest
from PIL import Image, ImageOps
from sample_images import blocks, every_kind, jpeg_with_size, pattern, save, save_oriented

from imvec.data import decode
from imvec.data.decode import ImageDecodeError, decode_rgb, open_image


def pillow_rgb(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def test_opencv_jpeg_equals_pillow(tmp_path):
    path = save(pattern(97, 131, seed=3), tmp_path / "a.jpg", quality=90)
    ours = decode_rgb(path)
    assert ours.dtype == np.uint8 and ours.shape == (97, 131, 3)
    np.testing.assert_array_equal(ours, pillow_rgb(path))


def test_opencv_path_is_taken_for_jpeg(tmp_path, monkeypatch):
    cv2 = pytest.importorskip("cv2")
    calls = []
    real = cv2.imdecode
    monkeypatch.setattr(cv2, "imdecode", lambda *a: calls.append(1) or real(*a))
    decode_rgb(save(pattern(20, 20), tmp_path / "a.jpg"))
    decode_rgb(save(pattern(20, 20), tmp_path / "a.png"))
    assert calls == [1]  # the JPEG only; PNG goes to Pillow


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_exif_orientation_shows_the_image_upright(tmp_path, orientation, suffix):
    upright = blocks(48, 80)
    path = save_oriented(upright, tmp_path / f"o{suffix}", orientation, quality=95,
                         subsampling=0)
    ours = decode_rgb(path)
    assert ours.shape == upright.shape
    assert np.abs(ours.astype(int) - upright).mean() < 3  # a wrong turn gives ~100
    assert ours[:4, :4].max() < 40 and ours[-4:, -4:].min() > 215  # marker top-left
    np.testing.assert_array_equal(ours, pillow_rgb(path))


def test_every_mode_becomes_rgb(tmp_path):
    files = every_kind(tmp_path)
    for name in ("rgb.jpg", "gray.jpg", "alpha.png", "palette.gif", "cmyk.jpg"):
        ours = decode_rgb(files[name])
        assert ours.dtype == np.uint8 and ours.shape[2] == 3, name
        np.testing.assert_array_equal(ours, pillow_rgb(files[name]), err_msg=name)
    gray = decode_rgb(files["gray.jpg"])
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    with Image.open(files["alpha.png"]) as image:
        np.testing.assert_array_equal(decode_rgb(files["alpha.png"]), np.asarray(image)[..., :3])
    # 16-bit: the high byte, as TF's decode_png(dtype=uint8) (see the test below).
    with Image.open(files["sixteen.png"]) as image:
        raw = np.asarray(image)
    expected = (raw >> 8).astype(np.uint8)
    np.testing.assert_array_equal(decode_rgb(files["sixteen.png"]),
                                  np.repeat(expected[..., None], 3, axis=2))


def test_sixteen_bit_png_keeps_the_high_byte_as_libpng_strip_16(tmp_path):
    """TF's decode_png(dtype=uint8) asks libpng for png_set_strip_16; OpenCV's PNG reader
    asks libpng for the same, so its 8-bit reading is an independent reference. (Rounding
    v / 257, as before, differs for e.g. 400 -> 2 instead of 1.)"""
    cv2 = pytest.importorskip("cv2")
    raw = np.random.default_rng(7).integers(0, 65536, (37, 53), dtype=np.uint16)
    raw[0, :4] = (255, 383, 400, 65535)
    path = tmp_path / "sixteen.png"
    Image.fromarray(raw).save(path)
    reference = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    assert reference[0, :4].tolist() == [0, 1, 1, 255]
    ours = decode_rgb(path)
    np.testing.assert_array_equal(ours, np.repeat(reference[..., None], 3, axis=2))
    np.testing.assert_array_equal(np.asarray(open_image(path)), ours)


@pytest.mark.parametrize("name, reason", [
    ("truncated.jpg", "truncated"),
    ("empty.jpg", "empty file"),
    ("text.jpg", "not an image"),
    ("huge.png", "exceeds the limit of 89478485"),
])
def test_bad_files_give_one_line_reasons(tmp_path, name, reason):
    files = every_kind(tmp_path)
    with pytest.raises(ImageDecodeError, match=reason) as info:
        decode_rgb(files[name])
    assert "\n" not in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ImageDecodeError, match="file not found"):
        decode_rgb(tmp_path / "nope.jpg")


def test_pixel_limit_is_checked_before_opencv_decodes(tmp_path, monkeypatch):
    cv2 = pytest.importorskip("cv2")
    monkeypatch.setattr(cv2, "imdecode", lambda *a: pytest.fail("decoded a refused image"))
    path = save(pattern(40, 50), tmp_path / "a.jpg")
    with pytest.raises(ImageDecodeError, match="50x40 = 2000 pixels exceeds the limit of 1999"):
        decode_rgb(path, max_pixels=1999)
    with pytest.raises(ImageDecodeError, match="60000x50000"):
        decode_rgb(jpeg_with_size(tmp_path / "big.jpg", 60000, 50000))


def test_limit_can_be_raised_past_pillows_own(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    path = save(pattern(30, 30), tmp_path / "a.png")
    assert decode_rgb(path, max_pixels=None).shape == (30, 30, 3)


def test_decode_from_bytes_equals_from_file(tmp_path):
    path = save(pattern(33, 44), tmp_path / "a.jpg")
    np.testing.assert_array_equal(decode_rgb(path.read_bytes()), decode_rgb(path))


def test_without_opencv_pillow_decodes_the_same(tmp_path, monkeypatch):
    path = save_oriented(pattern(30, 40), tmp_path / "a.jpg", 8)
    expected = decode_rgb(path)
    monkeypatch.setattr(decode, "opencv", lambda: None)
    np.testing.assert_array_equal(decode_rgb(path), expected)
    np.testing.assert_array_equal(np.asarray(open_image(path)), expected)
