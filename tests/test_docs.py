"""The documentation site builds with --strict, and the Python examples of the README and
the docs pages run as written (offline: the handles they use get random weights)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A ```python block runs unless the line before its fence is an HTML comment "<!-- no-run ...>".
BLOCK = re.compile(r"^(?:(<!-- no-run[^\n]*-->)\n)?```python\n(.*?)^```", re.S | re.M)
# Handles the examples load; the fixture stores random weights for them in the cache.
HANDLES = ("google/imagenet/nasnet_mobile/feature_vector/3",
           "google/imagenet/mobilenet_v1_050_160/feature_vector/3")


def python_blocks(page: Path) -> list[tuple[str, bool]]:
    """(code, runs) of each ```python block of a page, in order."""
    return [(code, not marker)
            for marker, code in BLOCK.findall(page.read_text(encoding="utf-8"))]


def test_mkdocs_build_is_strict_clean(tmp_path):
    pytest.importorskip("mkdocs")
    site = tmp_path / "site"
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f",
                             str(ROOT / "mkdocs.yml"), "-d", str(site)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("imvec.load", "imvec.Module", "imvec.extract.run", "imvec.hub.Module"):
        assert name in api, f"the API reference lacks {name}"


def test_every_no_run_marker_sits_on_a_python_block():
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        markers = text.count("<!-- no-run")
        skipped = sum(not runs for _, runs in python_blocks(page))
        assert markers == skipped, f"{page.name}: a no-run marker is not right above ```python"


def make_photos(folder: Path, count: int = 6) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        (folder / f"group{i % 2}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (120 + 10 * i, 160, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"group{i % 2}" / f"img{i}.jpg")
    shutil.copy(folder / "group0" / "img0.jpg", folder / "cat.jpg")  # the examples' query


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder like a user's: photos/, features.parquet and features/ made from them, and
    a cache in which the examples' handles hold random weights (no download, same API)."""
    import imvec
    from imvec import hub
    from imvec.extract import ExtractJob, run
    from imvec.registry import find_card
    from imvec.weights.sources import weights_path

    root = tmp_path_factory.mktemp("docs")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("IMVEC_HOME", str(root / "home"))
        env.setenv("IMVEC_OFFLINE", "1")
        env.setenv("IMVEC_ENGINE", "fast")  # no ONNX export: the examples' results are the same
        for handle in HANDLES:
            hub.Module.export(imvec.load(handle, pretrained=False),
                              weights_path(find_card(handle)))
        make_photos(root / "photos")
        env.chdir(root)
        for output in ("features.parquet", "features/"):  # one file, and a sharded folder
            run(ExtractJob(inputs=("photos/",), model="nasnet_mobile", output=output,
                           progress=False))
        yield root


EXAMPLE_PAGES = [page for page in PAGES if any(runs for _, runs in python_blocks(page))]


@pytest.mark.parametrize("page", EXAMPLE_PAGES, ids=[p.name for p in EXAMPLE_PAGES])
def test_python_examples_run(page, workspace, tmp_path, monkeypatch):
    blocks = python_blocks(page)
    folder = tmp_path / "work"  # a fresh copy: examples may write files
    shutil.copytree(workspace, folder, ignore=shutil.ignore_patterns("home"))
    monkeypatch.chdir(folder)
    monkeypatch.setenv("IMVEC_HOME", str(workspace / "home"))
    monkeypatch.setenv("IMVEC_OFFLINE", "1")
    monkeypatch.setenv("IMVEC_ENGINE", "fast")
    warnings.simplefilter("error", UserWarning)  # an example that imvec warns about is wrong
    namespace: dict = {"__name__": "__docs__"}
    for number, (code, runs) in enumerate(blocks, 1):
        if runs:
            try:
                exec(compile(code, f"{page.name} python block {number}", "exec"), namespace)
            except Exception as error:
                raise AssertionError(f"{page.name}, python block {number} fails: {error!r}\n"
                                     f"{code}") from error
