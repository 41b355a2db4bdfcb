"""The README's test command is the one CI runs; its quick-start example works."""

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
