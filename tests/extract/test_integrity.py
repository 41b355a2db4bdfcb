"""Issue 17, points 1-4: clean exits, computed weights identity, changed inputs, odd names."""

import copy
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from extract_helpers import make_folder, module, pattern, save, weights  # noqa: F401 (fixtures)

import imvec
from imvec.extract import ExtractJob, read_features, read_metadata, run
from imvec.extract.provenance import weights_sha256
from imvec.extract.workdir import ResumeError
from imvec.weights.convert import read_metadata as weights_metadata
from imvec.weights.convert import save_converted

SIZE = 32


def job(folder, model, out, **options):
    options = {"progress": False, "workers": 1, "size": SIZE, **options}
    return ExtractJob((str(folder),), model, out, **options)


def crash_midway(folder, model, out, monkeypatch) -> None:
    from test_resume import SimulatedCrash, crash_after

    crash_after(monkeypatch, 2)
    with pytest.raises(SimulatedCrash):
        run(job(folder, model, out, commit_every=2, batch_size=2))
    monkeypatch.undo()


# -- 1. exit code 0 -----------------------------------------------------------------------
def _fresh(args: list[str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_reading_a_result_exits_0_in_30_fresh_processes(tmp_path, weights, module):
    run(job(make_folder(tmp_path / "in", 6), module, tmp_path / "out.parquet"))
    readme = ("import imvec; ids, X = imvec.read_features('out.parquet'); "
              "print(len(ids), X.shape)")
    with ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda _: _fresh(["-c", readme], tmp_path), range(30)))
    codes = [p.returncode for p in done]
    assert codes == [0] * 30, [p.stderr[-300:] for p in done if p.returncode]
    assert all(p.stdout.strip() == "6 (6, 256)" for p in done)
    rerun = ["-m", "imvec.cli", "extract", "in", "--model", str(weights), "-o", "out.parquet",
             "--size", str(SIZE), "--workers", "1", "--quiet"]
    for _ in range(4):  # a rerun on a finished output reads it, then exits
        again = _fresh(rerun, tmp_path)
        assert again.returncode == 0 and "already complete" in again.stderr, again.stderr


# -- 2. the weights' identity is computed ----------------------------------------------------
def _twin(weights, path, change) -> str:
    """Another file of the same source (same metadata, source sha256 included)."""
    net = imvec.load(weights).net
    with torch.no_grad():
        change(net)
    save_converted(net, path, {**weights_metadata(weights), "source_sha256": "ab" * 32})
    return path


def _bump_first(net) -> None:
    next(net.parameters()).add_(1e-3)


def test_files_of_one_source_with_other_tensors_differ(tmp_path, weights, module):
    raw = _twin(weights, tmp_path / "raw.safetensors", lambda net: None)
    ema = _twin(weights, tmp_path / "ema.safetensors", _bump_first)  # e.g. EMA vs raw
    assert weights_metadata(ema)["source_sha256"] == weights_metadata(raw)["source_sha256"]
    assert weights_sha256(imvec.load(ema)) != weights_sha256(imvec.load(raw))
    assert weights_sha256(imvec.load(raw)) == weights_sha256(module)


def test_a_module_changed_in_memory_differs(weights):
    changed = copy.deepcopy(imvec.load(weights))
    before = weights_sha256(changed)
    with torch.no_grad():
        _bump_first(changed.net)
    assert weights_sha256(changed) != before


def test_two_full_finetunes_of_one_base_differ(tmp_path, weights):
    from imvec.finetune.model import new_classifier, save_classifier

    digests = set()
    base = imvec.load(_twin(weights, tmp_path / "base.safetensors", lambda net: None))
    for shift in (0.0, 1e-3):  # the same head, backbones trained differently
        net = new_classifier(base, 3)
        with torch.no_grad():
            for parameter in net.parameters():
                parameter.copy_(torch.linspace(-1, 1, parameter.numel()).view_as(parameter))
            next(net.parameters()).add_(shift)
        path = save_classifier(net, base, tmp_path / f"run{shift}.safetensors", ["a", "b", "c"],
                               (SIZE, SIZE), {"mode": "full"})
        digests.add(weights_sha256(imvec.load(path)))
    assert len(digests) == 2


def test_other_weights_cannot_resume_nor_pass_for_complete(tmp_path, weights, module,
                                                           monkeypatch):
    folder = make_folder(tmp_path / "in", 6)
    weights = _twin(weights, tmp_path / "raw.safetensors", lambda net: None)
    other = _twin(weights, tmp_path / "ema.safetensors", _bump_first)
    out = tmp_path / "f.parquet"
    crash_midway(folder, weights, out, monkeypatch)
    with pytest.raises(ResumeError, match=r"unfinished work made differently: model "
                                          r"weights_sha256 was '[0-9a-f]{64}', now"):
        run(job(folder, other, out))
    run(job(folder, weights, out))
    with pytest.raises(ResumeError, match="exists and was made differently: model "
                                          "weights_sha256"):
        run(job(folder, other, out))
    assert read_metadata(out)["model"]["weights_sha256"] == weights_sha256(module)


# -- 3. changed inputs are noticed ----------------------------------------------------------
def _rewrite(path, seed: int | None) -> None:
    """New content (flat black without a seed), one second newer."""
    mtime = path.stat().st_mtime_ns
    save(pattern(64, 64, seed=seed) if seed is not None else np.zeros((64, 64, 3), np.uint8),
         path)
    os.utime(path, ns=(mtime + 10**9, mtime + 10**9))


def test_changed_broken_and_fixed_images_are_recomputed_on_resume(tmp_path, module,
                                                                   monkeypatch):
    folder = make_folder(tmp_path / "in", 8)
    (folder / "broken.png").write_bytes(b"not yet an image")
    out = tmp_path / "f.parquet"
    crash_midway(folder, module, out, monkeypatch)
    first = sorted(folder.rglob("*.jpg"))[:2]  # computed before the crash
    ids_before, vectors_before = read_features(_reference(tmp_path, folder, module, "a"))
    save(np.full((64, 64, 3), 90, np.uint8), folder / "broken.png")  # fixed
    first[0].write_bytes(b"now broken")  # broken
    _rewrite(first[1], None)  # rewritten
    result = run(job(folder, module, out))
    assert any("3 images changed since they were computed" in n for n in result.notes)
    reference = _reference(tmp_path, folder, module, "b")
    ids, vectors = read_features(out)
    ref_ids, ref = read_features(reference)
    assert ids == ref_ids and "broken.png" in ids
    np.testing.assert_allclose(vectors, ref, rtol=1e-5, atol=1e-6)
    assert (tmp_path / "f.errors.csv").read_text() == (tmp_path / "b.errors.csv").read_text()
    rewritten = first[1].relative_to(folder).as_posix()
    assert not np.allclose(vectors_before[ids_before.index(rewritten)],
                           vectors[ids.index(rewritten)])


def _reference(tmp_path, folder, module, name):
    return run(job(folder, module, tmp_path / f"{name}.parquet", overwrite=True)).output


def test_a_finished_output_refuses_changed_or_other_inputs(tmp_path, module):
    folder = make_folder(tmp_path / "in", 4)
    out = tmp_path / "f.parquet"
    run(job(folder, module, out))
    _rewrite(sorted(folder.rglob("*.jpg"))[0], 78)
    with pytest.raises(ResumeError, match="complete but 1 images changed since it was made"):
        run(job(folder, module, out))
    other = tmp_path / "other"
    for name in ("x.png", "y.png", "z.png"):
        save(pattern(64, 64, seed=len(name)), other / name)
    with pytest.raises(ResumeError, match="complete but 3 listed images are not in it"):
        run(job(other, module, out))


def test_verify_inputs_sees_a_rewrite_that_keeps_size_and_mtime(tmp_path, module):
    folder = tmp_path / "in"
    image = save(np.full((64, 64, 3), 10, np.uint8), folder / "a.png")
    out = tmp_path / "f.parquet"
    run(job(folder, module, out, verify_inputs=True))
    info = image.stat()
    data = bytearray(image.read_bytes())
    data[-20] ^= 0xFF  # same size: a flipped byte in the last chunk's CRC
    image.write_bytes(bytes(data))
    os.utime(image, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert run(job(folder, module, out)).computed == 0  # size + mtime cannot see it
    with pytest.raises(ResumeError, match="1 images changed"):
        run(job(folder, module, out, verify_inputs=True))


# -- 4. file names that are not UTF-8 --------------------------------------------------------
@pytest.mark.skipif(sys.platform != "linux", reason="Linux allows any bytes in a name")
@pytest.mark.parametrize("suffix", ["parquet", "npy"])
def test_names_that_are_not_utf8_are_kept_exactly(tmp_path, module, suffix):
    folder = make_folder(tmp_path / "in", 2)
    raw = os.path.join(os.fsencode(folder), b"\xff\xfe.jpg")
    with open(raw, "wb") as f:
        f.write((folder / "group0" / "img0000.jpg").read_bytes())
    with open(os.path.join(os.fsencode(folder), b"caf\xe9.png"), "wb") as f:
        f.write(b"broken")
    name = os.fsdecode(b"\xff\xfe.jpg")
    assert name in os.listdir(folder)
    out = tmp_path / f"f.{suffix}"
    result = run(job(folder, module, out))
    assert (result.ok, result.failed) == (3, 1)
    ids, vectors = read_features(out)
    assert ids == ["group0/img0000.jpg", "group1/img0001.jpg", name]
    np.testing.assert_array_equal(vectors[ids.index(name)], vectors[0])  # same bytes
    assert run(job(folder, module, out)).notes == ["already complete: nothing to compute"]
    assert os.fsdecode(b"caf\xe9.png") in (tmp_path / "f.errors.csv").read_bytes().decode(
        "utf-8", "surrogateescape")
