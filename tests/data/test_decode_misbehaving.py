"""Files that misbehave: FIFOs, devices and folders named like images, JPEGs missing data."""

import io
import os
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image
from sample_images import pattern, save

from imvec.data import decode
from imvec.data.decode import ImageDecodeError, decode_rgb, open_image
from imvec.data.preprocess import Preprocessing


def _unblock_a_reader(fifo, done: threading.Event) -> None:
    """Opens ``fifo`` for writing as soon as someone waits to read it, then closes it: a
    decoder blocked in open() gets an empty file instead of hanging the test forever."""
    while not done.is_set():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            return
        except OSError:  # ENXIO: no reader waiting (yet)
            time.sleep(0.05)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs")
def test_a_fifo_named_like_an_image_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    done = threading.Event()
    rescuer = threading.Thread(target=_unblock_a_reader, args=(fifo, done), daemon=True)
    rescuer.start()
    try:
        with pytest.raises(ImageDecodeError, match=r"a FIFO \(named pipe\), not an image file"):
            decode_rgb(fifo)
        with pytest.raises(ImageDecodeError, match="FIFO"):
            open_image(fifo)
    finally:
        done.set()
        rescuer.join()


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="a character device")
def test_a_device_is_refused_before_reading(tmp_path):
    with pytest.raises(ImageDecodeError, match="a character device, not an image file"):
        decode_rgb("/dev/zero")


@pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="Unix sockets")
def test_a_socket_and_a_folder_are_refused(tmp_path):
    path = tmp_path / "s.png"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        with pytest.raises(ImageDecodeError, match="a socket, not an image file"):
            decode_rgb(path)
    (tmp_path / "d.jpg").mkdir()
    with pytest.raises(ImageDecodeError, match="a directory, not an image file"):
        decode_rgb(tmp_path / "d.jpg")


def jpeg(mode: str = "RGB", **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pattern(120, 160, seed=2)).convert(mode).save(buffer, "JPEG", **options)
    return buffer.getvalue()


def without_half_the_scan(data: bytes) -> bytes:
    """The second half of the entropy-coded data cut out, the end marker (FFD9) kept."""
    scan = data.index(b"\xff\xda")
    return data[:(scan + len(data)) // 2] + data[-2:]


@pytest.mark.parametrize("mode, options", [
    ("RGB", {}),  # OpenCV decodes these two
    ("L", {}),
    ("RGB", {"progressive": True}),
    ("CMYK", {}),  # Pillow decodes this one; OpenCV only listens to libjpeg
])
def test_a_jpeg_missing_half_its_data_is_refused_unless_accepted(mode, options):
    whole = jpeg(mode, **options)
    damaged = without_half_the_scan(whole)
    with pytest.raises(ImageDecodeError, match="damaged JPEG data.*premature end of data "
                       "segment.*--accept-truncated") as info:
        decode_rgb(damaged)
    assert "\n" not in str(info.value)
    accepted = decode_rgb(damaged, accept_truncated=True)
    good = decode_rgb(whole)
    assert accepted.shape == good.shape
    rows = len(good) // 4  # the top survived, the bottom is what was missing
    if not options:  # (a progressive JPEG's first scans cover the whole image, coarsely)
        np.testing.assert_array_equal(accepted[:rows], good[:rows])
    assert (accepted[-rows:] != good[-rows:]).mean() > 0.5


def test_accepting_is_a_preprocessing_option_recorded_only_when_set():
    damaged = without_half_the_scan(jpeg())
    with pytest.raises(ImageDecodeError, match="damaged JPEG data"):
        Preprocessing((8, 8))(damaged)
    assert Preprocessing((8, 8), accept_truncated=True)(damaged).shape == (8, 8, 3)
    assert "accept_truncated" not in Preprocessing((8, 8)).describe()
    assert Preprocessing((8, 8), accept_truncated=True).describe()["accept_truncated"] is True


def test_a_jpeg_cut_short_is_refused_unless_accepted():
    whole = jpeg()
    cut = whole[: len(whole) // 2]  # no end marker at all
    with pytest.raises(ImageDecodeError, match="truncated.*--accept-truncated"):
        decode_rgb(cut)
    assert decode_rgb(cut, accept_truncated=True).shape == (120, 160, 3)
    assert Image.open(io.BytesIO(cut)).load is not None  # Pillow's switch was put back:
    with pytest.raises(OSError, match="truncated"):
        Image.open(io.BytesIO(cut)).load()


def test_bytes_after_the_scan_are_harmless(tmp_path):
    whole = jpeg()
    padded = whole[:-2] + b"\x00" * 5 + whole[-2:]
    np.testing.assert_array_equal(decode_rgb(padded), decode_rgb(whole))


def test_other_messages_printed_while_decoding_still_reach_stderr(tmp_path, monkeypatch,
                                                                    capfd):
    cv2 = pytest.importorskip("cv2")
    real = cv2.imdecode

    def chatty(*args):
        os.write(2, b"someone else's message\n")
        return real(*args)

    monkeypatch.setattr(cv2, "imdecode", chatty)
    path = save(pattern(20, 20), tmp_path / "a.jpg")
    assert decode_rgb(path).shape == (20, 20, 3)
    assert "someone else's message" in capfd.readouterr().err


def test_without_opencv_a_damaged_jpeg_still_decodes_as_before(monkeypatch):
    """Pillow keeps libjpeg's warnings to itself: without OpenCV there is nothing to hear."""
    monkeypatch.setattr(decode, "opencv", lambda: None)
    assert decode_rgb(without_half_the_scan(jpeg())).shape == (120, 160, 3)
