"""Writes tf_resize_reference.npz: TensorFlow's resize and central crop of random images,
and a TF-Hub user's whole pipeline (decode_jpeg -> convert_image_dtype -> central_crop ->
resize) on one JPEG.

Run by hand in an environment with TensorFlow 2 (here tensorflow-cpu 2.21):
    python tests/data/make_tf_resize_reference.py
The test compares imvec.data.resize with these arrays; they come from TensorFlow itself.
"""

import io
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image

SHAPES = [(37, 53), (1, 5), (60, 45), (7, 7), (120, 90)]
SIZES = [(16, 16), (24, 18), (5, 9), (20, 30), (11, 11)]


def main() -> None:
    rng = np.random.default_rng(20261122)
    arrays = {}
    for h, w in SHAPES:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        arrays[f"image_{h}x{w}"] = image
        arrays[f"crop0.875_{h}x{w}"] = tf.image.central_crop(image, 0.875).numpy()
        for size in SIZES:
            # TF2 default: bilinear, half-pixel centers, antialias=False; float32 out.
            arrays[f"resize_{h}x{w}_to_{size[0]}x{size[1]}"] = tf.image.resize(image, size).numpy()
    y, x = np.mgrid[0:90, 0:120]
    photo = np.stack([np.sin(x / 9 + c) * np.cos(y / 7 - c) for c in range(3)], -1) * 100 + 128
    photo = np.clip(photo + rng.normal(0, 6, photo.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, "JPEG", quality=90)
    jpeg = buffer.getvalue()
    arrays["jpeg_bytes"] = np.frombuffer(jpeg, np.uint8)
    for method in ("INTEGER_ACCURATE", ""):
        image = tf.image.convert_image_dtype(tf.io.decode_jpeg(jpeg, dct_method=method),
                                             tf.float32)
        name = method.lower() or "default"
        arrays[f"pipeline_{name}"] = tf.image.resize(image, (24, 32)).numpy()
        arrays[f"pipeline_{name}_crop0.875"] = tf.image.resize(
            tf.image.central_crop(image, 0.875), (24, 32)).numpy()
    out = Path(__file__).with_name("tf_resize_reference.npz")
    np.savez_compressed(out, tf_version=np.array(tf.__version__), **arrays)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
