"""docs/extraction.md stays true: its commands parse, its SQL and Python run."""

import re
import shlex
from pathlib import Path

import pytest
from extract_helpers import make_folder, random_mobilenet

from imvec.cli import build_parser
from imvec.extract import ExtractJob, run

README = Path(__file__).resolve().parents[2] / "docs" / "extraction.md"
SECTION = "# Extracting features from an image collection"


def section() -> str:
    text = README.read_text()
    return text[text.index(SECTION):]  # the whole page is the section


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section(), re.S)


def test_every_imvec_command_in_the_doc_parses():
    parser = build_parser()
    commands = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("imvec "):
                commands.append(shlex.split(line)[1:])
    assert len(commands) >= 4
    for argv in commands:
        parser.parse_args(argv)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    root = tmp_path_factory.mktemp("doc")
    folder = make_folder(root / "photos", 5)
    (folder / "cat.jpg").write_bytes((folder / "group0" / "img0000.jpg").read_bytes())
    return run(ExtractJob((str(folder),), random_mobilenet(root / "m.safetensors"),
                          root / "features.parquet", size=32, progress=False)).output


def test_the_duckdb_queries_run(result):
    duckdb = pytest.importorskip("duckdb")
    (sql,) = blocks("sql")
    queries = [q for q in sql.split(";") if q.strip().replace("-- DuckDB", "").strip()]
    outputs = [duckdb.sql(q.replace("features.parquet", str(result))).fetchall()
               for q in queries]
    assert len(outputs[0]) == 0  # no 2019/ ids here
    assert b"imvec" in {key for key, _ in outputs[1]}
    best = outputs[2]
    assert best[0][:2] == ("cat.jpg", "cat.jpg") and best[0][2] == pytest.approx(1.0)
    assert best[1][1] == "group0/img0000.jpg" and best[1][2] == pytest.approx(1.0)


def test_the_python_snippets_run(result, monkeypatch):
    pytest.importorskip("pandas")
    monkeypatch.chdir(result.parent)
    for block in blocks("python")[1:3]:  # the reading examples
        exec(block, {})
