"""`imvec extract` and `imvec neighbors`: exit codes, summary line, progress, errors."""

import re

import pytest
from extract_helpers import make_folder, random_mobilenet

from imvec.cli import build_parser, main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    folder = make_folder(root / "photos", 7)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    return folder, random_mobilenet(root / "random.safetensors")


def test_extract_exits_0_with_bad_images_and_prints_one_summary(setup, tmp_path, capsys):
    folder, weights = setup
    out = tmp_path / "features.parquet"
    assert main(["extract", str(folder), "--model", str(weights), "-o", str(out),
                 "--size", "32", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    (line,) = captured.out.strip().splitlines()
    assert re.fullmatch(rf"imvec extract: 8 images -> {re.escape(str(out))} \(7 ok, 1 failed -> "
                        r".*features\.errors\.csv\); 8 computed in [\d.]+ s \([\d.]+ images/s\)",
                        line), line
    assert "broken.jpg,not an image" in (tmp_path / "features.errors.csv").read_text()


def test_progress_bar_goes_to_stderr(setup, tmp_path, capsys):
    folder, weights = setup
    assert main(["extract", str(folder), "-m", str(weights), "-o", str(tmp_path / "f.npy"),
                 "--size", "32", "--workers", "1"]) == 0
    captured = capsys.readouterr()
    assert "8/8" in captured.err and "img/s" in captured.err
    assert captured.out.startswith("imvec extract: 8 images") and (tmp_path / "f.npy").exists()


def test_job_failures_exit_1_with_one_line_and_write_nothing(setup, tmp_path, capsys):
    _, weights = setup
    out = tmp_path / "sub" / "f.parquet"
    assert main(["extract", str(tmp_path / "missing"), "-m", str(weights), "-o", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing: no such file or folder" in err[0]
    assert not (tmp_path / "sub").exists()
    assert main(["extract", str(tmp_path), "-m", str(weights), "-o", str(out), "--crop", "2"]) == 1
    assert "crop must be a fraction" in capsys.readouterr().err


def test_resume_refusal_names_the_fix(setup, tmp_path, capsys):
    folder, weights = setup
    out = tmp_path / "f.parquet"
    assert main(["extract", str(folder), "-m", str(weights), "-o", str(out), "--size", "32",
                 "-q"]) == 0
    assert main(["extract", str(folder), "-m", str(weights), "-o", str(out), "--size", "48",
                 "-q"]) == 1
    err = capsys.readouterr().err
    assert "preprocessing size was [32, 32], now [48, 48]" in err and "--overwrite" in err


def test_neighbors_prints_rank_score_path(setup, tmp_path, capsys):
    folder, weights = setup
    out = tmp_path / "f.parquet"
    assert main(["extract", str(folder), "-m", str(weights), "-o", str(out), "--size", "32",
                 "-q"]) == 0
    capsys.readouterr()
    query = sorted(folder.rglob("img*.jpg"))[2]
    assert main(["neighbors", str(query), "--index", str(out), "-k", "3"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert re.fullmatch(rf"\s*1  1\.0000  {re.escape(str(query))}", lines[0]), lines[0]
    assert main(["neighbors", str(folder / "broken.jpg"), "--index", str(out)]) == 1
    assert "not an image" in capsys.readouterr().err


def test_new_commands_document_every_option():
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for name in ("extract", "neighbors"):
        command = commands[name]
        assert command.description, name
        for action in command._actions:
            assert action.help, f"{name} {action.dest}"


def test_extract_precision_option_reaches_the_output(setup, tmp_path, capsys):
    from imvec.extract import read_metadata

    folder, weights = setup
    out = tmp_path / "f.parquet"
    assert main(["extract", str(folder), "-m", str(weights), "-o", str(out), "--size", "32",
                 "--precision", "bf16", "--quiet"]) == 0
    assert read_metadata(out)["model"]["precision"] == "bfloat16"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["extract", str(folder), "-m", "x", "-o", "y",
                                   "--precision", "float8"])
    assert "invalid choice: 'float8'" in capsys.readouterr().err


def test_engine_option_reaches_the_module_and_a_resume_may_change_it(setup, tmp_path,
                                                                      monkeypatch, capsys):
    """--engine picks the inference engine of extract and neighbors; the engines give the
    same vectors to float32 rounding, so the output does not record it and a rerun with
    another engine finds the job done instead of refusing it."""
    import importlib

    import numpy as np

    from imvec.extract import provenance, read_features

    runner = importlib.import_module("imvec.extract.runner")
    folder, weights = setup
    engines = []

    def spy(load_module):
        def load(*args, **kwargs):
            module = load_module(*args, **kwargs)
            engines.append(module.engine)
            return module
        return load

    monkeypatch.setattr(runner, "load_module", spy(runner.load_module))
    monkeypatch.setattr(provenance, "load_module", spy(provenance.load_module))
    monkeypatch.delenv("IMVEC_ENGINE", raising=False)
    common = [str(folder), "-m", str(weights), "--size", "32", "-q"]
    fast, faithful = tmp_path / "fast.parquet", tmp_path / "faithful.parquet"
    assert main(["extract", *common, "-o", str(fast)]) == 0
    assert main(["extract", *common, "-o", str(faithful), "--engine", "faithful"]) == 0
    assert main(["extract", *common, "-o", str(fast), "--engine", "faithful"]) == 0
    assert "already complete" in capsys.readouterr().err
    query = str(sorted(folder.rglob("img*.jpg"))[0])
    assert main(["neighbors", query, "--index", str(faithful), "--engine", "faithful"]) == 0
    assert engines == ["fast", "faithful", "faithful", "faithful"]
    (ids, a), (same_ids, b) = read_features(fast), read_features(faithful)
    assert ids == same_ids
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
