"""First calls at once: threads of one process, and processes sharing one ONNX cache, each
build (export) an engine once and get TF's features, with no fallback and no warning."""

from __future__ import annotations

import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import FIXTURES, assert_close

import imvec
from imvec.engines.graph import onnxruntime_available

pytestmark = pytest.mark.skipif(not onnxruntime_available(), reason="needs onnxruntime")

SMALL = FIXTURES / "nasnet_mobile_small"


@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty $IMVEC_HOME: no ONNX export is cached yet."""
    monkeypatch.setenv("IMVEC_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("IMVEC_ENGINE", raising=False)
    return tmp_path / "home"


def test_four_threads_making_the_first_call_share_one_engine(converted, home):
    path = converted("nasnet_mobile_small")
    modules = [imvec.load(path), imvec.load(path)]  # two modules of one file: one cache entry
    images = np.load(SMALL / "inputs.npy")
    outputs: list = [None] * 4
    caught: list = []
    start = threading.Barrier(4)

    def first_call(i: int) -> None:
        start.wait()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                outputs[i] = modules[i % 2](images).numpy()
            except Exception as exc:  # noqa: BLE001 (reported below, with the warnings)
                caught.append(repr(exc))
        caught.extend(str(w.message) for w in seen)

    threads = [threading.Thread(target=first_call, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert caught == []
    assert [m.engine for m in modules] == ["onnxruntime", "onnxruntime"]
    expected = np.load(SMALL / "expected.npz")["features"]
    for i, out in enumerate(outputs):
        assert_close(f"thread {i} features", out, expected)
    exports = list((home / "onnx").glob("*.onnx"))
    assert len(exports) == 1
    assert not [p for p in (home / "onnx").iterdir() if p.name.endswith(".tmp")]


PROCESS = """
import sys, warnings
import numpy as np
import imvec
warnings.simplefilter("error")
module = imvec.load(sys.argv[1])
out = module(np.load(sys.argv[2]))
assert module.engine == "onnxruntime", module.engine
np.save(sys.argv[3], out.numpy())
"""


def test_processes_sharing_a_cold_cache_each_get_the_export(converted, home, tmp_path):
    path = converted("nasnet_mobile_small")
    runs = [subprocess.Popen([sys.executable, "-c", PROCESS, str(path),
                              str(SMALL / "inputs.npy"), str(tmp_path / f"out{i}.npy")],
                             stderr=subprocess.PIPE, text=True) for i in range(3)]
    for run in runs:
        _, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-2000:]
    expected = np.load(SMALL / "expected.npz")["features"]
    for i in range(3):
        assert_close(f"process {i} features", np.load(tmp_path / f"out{i}.npy"), expected)
    onnx = Path(home / "onnx")
    assert len(list(onnx.glob("*.onnx"))) == 1
    assert not [p for p in onnx.iterdir() if p.name.endswith(".tmp")]
