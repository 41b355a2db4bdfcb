"""DecodePool: order kept, memory bounded, a crashing decoder costs one image only."""

import os

import numpy as np
import pytest
from extract_helpers import make_folder

from imvec.data.preprocess import Preprocessing
from imvec.data.sources import Item, list_images
from imvec.extract.pool import CRASHED, DecodePool, decode_items


def test_chunks_come_back_in_order_with_per_image_errors(tmp_path):
    folder = make_folder(tmp_path, 9, size=20)
    (folder / "group0" / "bad.jpg").write_bytes(b"nope")
    items = list_images([folder])
    preprocessing = Preprocessing((8, 8))
    chunks = [items[i:i + 2] for i in range(0, len(items), 2)]
    with DecodePool(preprocessing, 2) as pool:
        results = list(pool.imap(chunks))
    assert [i.id for r in results for i in r.items] == [i.id for i in items]
    errors = [e for r in results for e in r.errors]
    assert [i.id for i, e in zip(items, errors, strict=True) if e] == ["group0/bad.jpg"]
    images = np.concatenate([r.images for r in results])
    expected = decode_items(preprocessing, [i for i in items if i.id != "group0/bad.jpg"])
    np.testing.assert_array_equal(images, expected.images)


def test_at_most_a_bounded_number_of_chunks_in_flight(tmp_path):
    folder = make_folder(tmp_path, 30, size=12)
    items = list_images([folder])
    pulled = []

    def chunks():
        for item in items:
            pulled.append(item)
            yield [item]

    with DecodePool(Preprocessing((4, 4)), 2) as pool:
        for got, _ in enumerate(pool.imap(chunks()), 1):
            assert len(pulled) - got < pool.max_in_flight


def _crash_on_poison(self, source):
    if str(source).endswith("poison.jpg"):
        os._exit(3)  # as a segfaulting decoder would: the worker process dies
    return _real_call(self, source)


_real_call = Preprocessing.__call__


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the patched decoder reaches workers by fork")
def test_a_decoder_that_kills_its_worker_costs_only_that_image(tmp_path, monkeypatch):
    folder = make_folder(tmp_path, 6, size=16)
    (folder / "group1" / "poison.jpg").write_bytes(b"whatever")
    monkeypatch.setattr(Preprocessing, "__call__", _crash_on_poison)
    items = list_images([folder])
    chunks = [items[i:i + 3] for i in range(0, len(items), 3)]
    with DecodePool(Preprocessing((4, 4)), 2) as pool:
        results = list(pool.imap(chunks))
        assert pool.restarts >= 1
    errors = {i.id: e for r in results for i, e in zip(r.items, r.errors, strict=True)}
    assert errors.pop("group1/poison.jpg") == CRASHED
    assert set(errors) == {i.id for i in items} - {"group1/poison.jpg"}
    assert not any(errors.values())
    assert sum(len(r.images) for r in results) == 6


def test_decode_items_turns_unexpected_exceptions_into_reasons(monkeypatch):
    def boom(self, source):
        raise RuntimeError("decoder bug")

    monkeypatch.setattr(Preprocessing, "__call__", boom)
    result = decode_items(Preprocessing((4, 4)), [Item("a", "a.jpg")])
    assert result.errors == ["RuntimeError: decoder bug"] and result.images.shape == (0, 4, 4, 3)
