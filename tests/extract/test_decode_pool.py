"""DecodePool: batches in order, straight into shared buffers, memory bounded, a crashing
or hanging decoder costs one image only."""

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from extract_helpers import make_folder, pattern, save, weights  # noqa: F401 (fixture)
from test_decode_misbehaving import _unblock_a_reader

from imvec.data import preprocess
from imvec.data.preprocess import Preprocessing
from imvec.data.sources import Item, list_images
from imvec.extract.pool import CRASHED, DecodePool, decode_into

fork_only = pytest.mark.skipif(not hasattr(os, "fork"),
                               reason="shared buffers and patched decoders reach workers by fork")


@pytest.mark.parametrize("shared", [pytest.param(True, marks=fork_only), False])
@pytest.mark.parametrize("lookahead", [0, 2])
def test_batches_come_in_order_scaled_with_per_image_errors(tmp_path, shared, lookahead):
    folder = make_folder(tmp_path, 9, size=20)
    (folder / "group0" / "bad.jpg").write_bytes(b"nope")
    items = list_images([folder])
    preprocessing = Preprocessing((8, 8))
    with DecodePool(preprocessing, 2, batch_size=4, lookahead=lookahead, chunk=1,
                    shared=shared) as pool:
        assert pool.ring.shared is shared
        batches = [(b.items, b.errors, b.images.copy()) for b in pool.batches(items)]
    assert [len(i) for i, _, _ in batches] == [4, 4, 2]
    assert [i.id for b in batches for i in b[0]] == [i.id for i in items]
    errors = [e for b in batches for e in b[1]]
    assert [i.id for i, e in zip(items, errors, strict=True) if e] == ["group0/bad.jpg"]
    images = np.concatenate([b[2] for b in batches])[[e is None for e in errors]]
    expected = np.stack([preprocessing(i.path) for i in items if i.id != "group0/bad.jpg"])
    # The network's input, rounded as the module rounds (images * 2 - 1 in float32).
    np.testing.assert_array_equal(images, expected * np.float32(2) - np.float32(1))


def test_shared_buffers_are_reused_and_only_lookahead_batches_decode_ahead(tmp_path):
    folder = make_folder(tmp_path, 30, size=12)
    items = list_images([folder])
    pool = DecodePool(Preprocessing((4, 4)), 2, batch_size=3, lookahead=1)
    assert pool.ring.slots == 2
    with pool:
        seen = set()
        for got, batch in enumerate(pool.batches(items), 1):
            seen.add(batch.images.__array_interface__["data"][0])
            assert len(pool._pending) <= pool.lookahead * -(-3 // pool.chunk)
            assert got * 3 <= len(items)
    assert len(seen) == 2  # two buffers, taken in turn


def _crash_on_poison(self, source):
    if str(source).endswith("poison.jpg"):
        os._exit(3)  # as a segfaulting decoder would: the worker process dies
    return _real_call(self, source)


_real_call = Preprocessing.__call__


@fork_only
@pytest.mark.parametrize("shared", [True, False])
def test_a_decoder_that_kills_its_worker_costs_only_that_image(tmp_path, monkeypatch, shared):
    folder = make_folder(tmp_path, 6, size=16)
    (folder / "group1" / "poison.jpg").write_bytes(b"whatever")
    monkeypatch.setattr(Preprocessing, "__call__", _crash_on_poison)
    items = list_images([folder])
    with DecodePool(Preprocessing((4, 4)), 2, batch_size=4, lookahead=1, chunk=2,
                    shared=shared) as pool:
        batches = [(b.items, b.errors, b.images.copy()) for b in pool.batches(items)]
        assert pool.restarts >= 1
    errors = {i.id: e for its, errs, _ in batches for i, e in zip(its, errs, strict=True)}
    assert errors.pop("group1/poison.jpg") == CRASHED
    assert set(errors) == {i.id for i in items} - {"group1/poison.jpg"}
    assert not any(errors.values())
    monkeypatch.undo()
    good = [i for i in items if i.id != "group1/poison.jpg"]
    images = np.concatenate([im for _, _, im in batches])[[i.id in errors for i in items]]
    np.testing.assert_array_equal(
        images, np.stack([Preprocessing((4, 4))(i.path) for i in good]) * np.float32(2) - 1)


def _slow_or_poison(self, source):
    if str(source).endswith("poison.jpg"):
        os._exit(3)
    time.sleep(0.3)  # still decoding when the poison kills the pool
    return _real_call(self, source)


@fork_only
def test_an_image_decoding_beside_a_crash_is_not_blamed_for_it(tmp_path, monkeypatch):
    folder = make_folder(tmp_path, 1, size=16)
    (folder / "poison.jpg").write_bytes(b"whatever")
    monkeypatch.setattr(Preprocessing, "__call__", _slow_or_poison)
    items = list_images([folder])
    assert [i.id for i in items] == ["group0/img0000.jpg", "poison.jpg"]
    with DecodePool(Preprocessing((4, 4)), 2, batch_size=2, chunk=1) as pool:
        (batch,) = [(b.items, b.errors) for b in pool.batches(items)]
    assert batch[1] == [None, CRASHED]


def _stuck_on(name: str):
    real = preprocess.decode_rgb

    def decode(source, *args):
        if str(source).endswith(name):
            time.sleep(3600)  # as a decoder looping forever on a hostile file would
        return real(source, *args)

    return decode


LATE = "decoding took longer than 1 s (the decode deadline; raise it with --decode-timeout)"


@fork_only
@pytest.mark.parametrize("shared", [True, False])
def test_an_image_stuck_past_the_deadline_costs_only_that_image(tmp_path, monkeypatch, shared):
    """The real deadline machinery: the worker's decode_rgb (inherited by fork) never
    returns for one file; the pool kills that worker, reports the image, decodes the rest."""
    folder = make_folder(tmp_path, 7, size=16)
    save(pattern(16, 16), folder / "group1" / "stuck.jpg")
    monkeypatch.setattr(preprocess, "decode_rgb", _stuck_on("stuck.jpg"))
    items = list_images([folder])
    with DecodePool(Preprocessing((4, 4)), 2, batch_size=4, lookahead=1, chunk=2,
                    shared=shared, deadline=1) as pool:
        batches = [(b.items, b.errors, b.images.copy()) for b in pool.batches(items)]
        assert pool.restarts >= 1
    errors = {i.id: e for its, errs, _ in batches for i, e in zip(its, errs, strict=True)}
    assert errors.pop("group1/stuck.jpg") == LATE
    assert set(errors) == {i.id for i in items} - {"group1/stuck.jpg"}
    assert not any(errors.values())
    monkeypatch.undo()
    good = [i for i in items if i.id in errors]
    images = np.concatenate([im for _, _, im in batches])[[i.id in errors for i in items]]
    np.testing.assert_array_equal(
        images, np.stack([Preprocessing((4, 4))(i.path) for i in good]) * np.float32(2) - 1)


@fork_only
def test_a_late_image_among_one_by_one_retries_is_still_late(tmp_path, monkeypatch):
    """A crash and a hang in one chunk: the retries one at a time meet the hang too."""
    folder = make_folder(tmp_path, 2, size=16)
    save(pattern(16, 16), folder / "group0" / "stuck.jpg")
    (folder / "group0" / "poison.jpg").write_bytes(b"whatever")
    stuck = _stuck_on("stuck.jpg")

    def decode(source, *args):
        if str(source).endswith("poison.jpg"):
            os._exit(3)
        return stuck(source, *args)

    monkeypatch.setattr(preprocess, "decode_rgb", decode)
    items = list_images([folder])
    with DecodePool(Preprocessing((4, 4)), 1, batch_size=4, chunk=4, deadline=1) as pool:
        (batch,) = list(pool.batches(items))
    errors = dict(zip([i.id for i in batch.items], batch.errors, strict=True))
    assert errors == {"group0/img0000.jpg": None, "group0/poison.jpg": CRASHED,
                      "group0/stuck.jpg": LATE, "group1/img0001.jpg": None}


@fork_only
def test_closing_the_pool_ends_a_worker_stuck_on_an_image(tmp_path, monkeypatch):
    folder = make_folder(tmp_path, 1, size=16)
    save(pattern(16, 16), folder / "stuck.jpg")
    monkeypatch.setattr(preprocess, "decode_rgb", _stuck_on("stuck.jpg"))
    items = list_images([folder])
    pool = DecodePool(Preprocessing((4, 4)), 1, batch_size=1, lookahead=1, deadline=1)
    with pool:
        batches = pool.batches(items)
        assert next(batches).errors == [None]  # the next one is decoding, forever
        workers = list(pool._executor._processes.values())
    assert workers and not any(worker.is_alive() for worker in workers)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs")
def test_a_fifo_among_the_images_is_reported_not_waited_for(tmp_path):
    folder = make_folder(tmp_path, 3, size=16)
    os.mkfifo(folder / "x.jpg")
    items = list_images([folder])
    done = threading.Event()
    # Unblocks a worker stuck in open() (as before the fix), so a failure cannot hang.
    rescuer = threading.Thread(target=_unblock_a_reader, args=(folder / "x.jpg", done),
                               daemon=True)
    rescuer.start()
    try:
        with DecodePool(Preprocessing((4, 4)), 2, batch_size=2) as pool:
            errors = [e for b in pool.batches(items) for e in b.errors]
    finally:
        done.set()
        rescuer.join()
    reasons = dict(zip([i.id for i in items], errors, strict=True))
    assert reasons.pop("x.jpg").startswith("a FIFO (named pipe), not an image file")
    assert not any(reasons.values())


def test_the_deadline_must_be_positive():
    with pytest.raises(ValueError, match="deadline must be a positive number of seconds"):
        DecodePool(Preprocessing((4, 4)), 1, batch_size=1, deadline=0)


def test_decode_into_turns_unexpected_exceptions_into_reasons(monkeypatch):
    def boom(self, source):
        raise RuntimeError("decoder bug")

    monkeypatch.setattr(Preprocessing, "__call__", boom)
    rows = np.full((1, 4, 4, 3), 7, np.float32)
    errors = decode_into(Preprocessing((4, 4)), [Item("a", "a.jpg")], rows)
    assert errors == ["RuntimeError: decoder bug"] and (rows == 7).all()  # row left as it was


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RSS from /proc")
def test_workers_give_back_a_huge_images_memory(tmp_path):
    from PIL import Image

    make_folder(tmp_path / "small", 1, size=64)
    Image.new("RGB", (6000, 5000), (90, 120, 200)).save(tmp_path / "huge.jpg")  # 90 MB RGB
    items = [*list_images([tmp_path / "small"]), Item("huge", str(tmp_path / "huge.jpg"))]
    with DecodePool(Preprocessing((8, 8)), 1, batch_size=1) as pool:
        batches = pool.batches(items)
        next(batches)
        (pid,) = pool._executor._processes
        before = _rss_mb(pid)
        batch = next(batches)
        grown = _rss_mb(pid) - before
    assert batch.errors == [None]
    np.testing.assert_allclose(batch.images[0, 0, 0], np.array([90, 120, 200]) / 255 * 2 - 1,
                               atol=2e-2)  # JPEG's color rounding
    assert grown < 40, f"the worker kept {grown:.0f} MB after decoding one huge image"


WORKER_HEAP = """
import numpy as np
from imvec.extract import pool
from imvec._system import tune_allocator
tune_allocator(True, largest=pool.WORKER_KEEPS_BLOCKS_UP_TO)  # as a worker starts
pool._RSS_KEPT[0] = start = pool._resident_bytes()
blocks = [np.ones(1 << 17) for _ in range(400)]  # 400 MB in 1 MB heap blocks
del blocks[::2]  # 200 MB freed between live blocks: no coalescing, nothing at the top to trim
freed = pool._resident_bytes() - start
pool._give_back_a_huge_images_memory()
print(freed >> 20, (pool._resident_bytes() - start) >> 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_a_worker_trims_memory_freed_inside_its_heap():
    """Blocks freed inside the heap stay resident (a huge image decoded into free chunks a
    forked worker inherited: seen after tests/test_inference.py ran in the same process);
    after a chunk, a worker that grew by more than it keeps on purpose trims them."""
    out = subprocess.run([sys.executable, "-c", WORKER_HEAP], capture_output=True, text=True,
                         check=True).stdout.split()
    resident_after_free, after_trim = int(out[0]), int(out[1])
    assert resident_after_free > 350  # the situation: freed, still resident
    assert resident_after_free - after_trim > 150


WORKER_COLLECTS_THE_PARENTS_GARBAGE = """
import gc, sys
import numpy as np
import imvec
from imvec.data.preprocess import Preprocessing
from imvec.extract.pool import DecodePool

module = imvec.load(sys.argv[1], engine="onnxruntime")
module(np.zeros((1, 32, 32, 3), np.float32))  # an ONNX Runtime session and its threads
gc.disable()
cycle = [module]
cycle.append(cycle)
del module, cycle  # unreachable, not collected yet: what a notebook often holds
with DecodePool(Preprocessing((32, 32)), workers=1, batch_size=1) as pool:
    print("collected", pool._executor.submit(gc.collect).result(timeout=60), flush=True)
"""


@fork_only
def test_a_worker_never_runs_the_destructors_of_its_parents_garbage(weights):
    """A forked worker whose garbage collector found the parent's unreachable ONNX Runtime
    session ran its destructor without the session's threads, and blocked for good (seen
    as every image of a job past the decode deadline)."""
    pytest.importorskip("onnxruntime")
    done = subprocess.run([sys.executable, "-c", WORKER_COLLECTS_THE_PARENTS_GARBAGE,
                           str(weights)], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]  # without the fix: TimeoutError
    assert done.stdout.startswith("collected ")
