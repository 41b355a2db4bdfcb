"""A job goes on past images that misbehave: a FIFO, a decoder that hangs, a JPEG missing
half its data; each is reported in the errors file with its reason, and the job completes."""

import csv
import io
import os
import threading
import time

import pytest
from extract_helpers import make_folder, module, pattern, save, weights  # noqa: F401 (fixtures)
from PIL import Image
from test_decode_misbehaving import _unblock_a_reader, without_half_the_scan

from imvec.cli import main
from imvec.data import preprocess
from imvec.extract import ExtractJob, read_features, read_metadata, run
from imvec.extract.workdir import ResumeError

SIZE = 32


def job(folder, weights, output, **options):
    options.setdefault("progress", False)
    options.setdefault("workers", 2)
    return ExtractJob((str(folder),), weights, output, size=SIZE, **options)


def reasons(result) -> dict[str, str]:
    with open(result.errors, newline="", encoding="utf-8") as f:
        return {os.path.basename(row[0]): row[1] for row in list(csv.reader(f))[1:]}


def half_missing_jpeg(path):
    buffer = io.BytesIO()
    Image.fromarray(pattern(64, 64, seed=9)).save(buffer, "JPEG", quality=92)
    path.write_bytes(without_half_the_scan(buffer.getvalue()))
    return path


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs")
def test_a_fifo_in_the_folder_is_reported_and_the_job_completes(tmp_path, weights):
    folder = make_folder(tmp_path / "in", 3)
    os.mkfifo(folder / "x.jpg")
    done = threading.Event()
    rescuer = threading.Thread(target=_unblock_a_reader, args=(folder / "x.jpg", done),
                               daemon=True)
    rescuer.start()  # before the fix a worker blocked in open(); this unblocks it
    try:
        result = run(job(folder, weights, tmp_path / "f.parquet"))
    finally:
        done.set()
        rescuer.join()
    assert (result.ok, result.failed) == (3, 1)
    assert reasons(result)["x.jpg"].startswith("a FIFO (named pipe), not an image file")


def _stuck_on(name: str):
    real = preprocess.decode_rgb

    def decode(source, *args):
        if str(source).endswith(name):
            time.sleep(3600)
        return real(source, *args)

    return decode


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the patched decoder reaches workers by fork")
def test_an_image_decoding_past_the_deadline_is_reported_and_the_job_completes(
        tmp_path, weights, monkeypatch):
    folder = make_folder(tmp_path / "in", 4)
    save(pattern(64, 64), folder / "slow.jpg")
    monkeypatch.setattr(preprocess, "decode_rgb", _stuck_on("slow.jpg"))
    result = run(job(folder, weights, tmp_path / "f.parquet", decode_timeout=1, batch_size=2))
    assert (result.ok, result.failed) == (4, 1)
    assert reasons(result)["slow.jpg"].startswith("decoding took longer than 1 s")
    with pytest.raises(ValueError, match="decode_timeout must be a positive number"):
        job(folder, weights, tmp_path / "g.parquet", decode_timeout=0)


def test_a_half_missing_jpeg_fails_unless_accepted_and_the_choice_is_recorded(tmp_path,
                                                                              weights):
    folder = make_folder(tmp_path / "in", 2)
    half_missing_jpeg(folder / "half.jpg")
    strict = run(job(folder, weights, tmp_path / "strict.parquet"))
    assert (strict.ok, strict.failed) == (2, 1)
    assert "damaged JPEG data" in reasons(strict)["half.jpg"]
    assert "accept_truncated" not in read_metadata(strict.output)["preprocessing"]

    lenient = run(job(folder, weights, tmp_path / "lenient.parquet", accept_truncated=True))
    assert (lenient.ok, lenient.failed) == (3, 0)
    assert "half.jpg" in read_features(lenient.output)[0]
    assert read_metadata(lenient.output)["preprocessing"]["accept_truncated"] is True
    with pytest.raises(ResumeError, match="accept_truncated"):
        run(job(folder, weights, tmp_path / "lenient.parquet"))


def test_cli_options_reach_the_job(tmp_path, weights, capsys):
    folder = make_folder(tmp_path / "in", 2)
    half_missing_jpeg(folder / "half.jpg")
    out = tmp_path / "f.parquet"
    assert main(["extract", str(folder), "-m", str(weights), "-o", str(out), "--size",
                 str(SIZE), "--quiet", "--accept-truncated", "--decode-timeout", "30"]) == 0
    assert "(3 ok, 0 failed)" in capsys.readouterr().out
    assert main(["extract", str(folder), "-m", str(weights), "-o", str(tmp_path / "g.parquet"),
                 "--size", str(SIZE), "--quiet", "--decode-timeout", "0"]) == 0
    assert "2 ok, 1 failed" in capsys.readouterr().out
