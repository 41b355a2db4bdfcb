"""The README's test command is the one CI runs; its quick-start example works; it stays a
short overview whose links lead somewhere."""

import re
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert ci in readme


def test_quickstart_example_runs(tmp_path, capsys):
    script = ROOT / "examples" / "quickstart.py"
    sys.argv = [str(script), str(tmp_path / "demo.safetensors")]
    runpy.run_path(str(script), run_name="__main__")
    out = capsys.readouterr().out
    assert "features (2, 288)" in out and (tmp_path / "demo.safetensors").exists()


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "imvec.cli", "models", "*mobilenet*"],
                            capture_output=True, text=True, check=True)
    assert "mobilenet_v1_050_160/feature_vector/3" in result.stdout


def test_readme_is_an_overview_whose_links_resolve():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250, "move details to docs/ and link them"
    targets = [t for t in re.findall(r"\]\(([^)#\s]+)[^)]*\)", readme) if "://" not in t]
    assert "docs/quickstart.md" in targets and "LICENSE" in targets
    missing = [t for t in targets if not (ROOT / t).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_the_main_job_command_is_the_same_in_readme_and_docs():
    def main_job(text: str) -> list[str]:
        return [line for line in text.splitlines() if "examples/make_demo.py demo" in line]

    readme = main_job((ROOT / "README.md").read_text())
    assert len(readme) == 1 and "imvec extract demo/images" in readme[0]
    assert main_job((ROOT / "docs" / "quickstart.md").read_text()) == readme
