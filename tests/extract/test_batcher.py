"""Batcher: full batches to the model, rows handed on in order with failures in place."""

import numpy as np

from imvec.data.sources import Item
from imvec.extract.pipeline import Batcher
from imvec.extract.pool import Decoded


def chunk(names, failed=()):
    items = [Item(n, n) for n in names]
    ok = [n for n in names if n not in failed]
    images = np.array([[[[float(n[1:])]]] for n in ok], np.float32).reshape(len(ok), 1, 1, 1)
    return Decoded(items, images, [("bad" if n in failed else None) for n in names])


def test_rows_come_out_in_order_and_batches_are_full():
    batches, rows = [], []

    def embed(images):
        batches.append(len(images))
        return np.repeat(images.reshape(len(images), 1), 2, axis=1) * 10

    def emit(items, features, errors):
        rows.extend(zip([i.id for i in items], features[:, 0].tolist(), errors, strict=True))

    batcher = Batcher(embed, 3, 2, emit)
    batcher.add(chunk(["x1", "x2"], failed={"x2"}))
    batcher.add(chunk(["x3", "x4", "x5"]))
    batcher.add(chunk(["x6", "x7"], failed={"x6"}))
    batcher.add(chunk(["x8", "x9"], failed={"x9"}))
    batcher.flush()
    assert batches == [3, 3]
    assert rows == [("x1", 10.0, None), ("x2", 0.0, "bad"), ("x3", 30.0, None),
                    ("x4", 40.0, None), ("x5", 50.0, None), ("x6", 0.0, "bad"),
                    ("x7", 70.0, None), ("x8", 80.0, None), ("x9", 0.0, "bad")]
