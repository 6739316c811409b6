"""The README's set-up commands are the ones CI runs."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ci_runs_the_readme_install_and_test_commands():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Set up", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    install, test, main_job = [line for line in block.strip().splitlines() if line.strip()]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert install in ci_lines, f"README install command not in .ci/run: {install}"
    assert test in ci_lines, f"README test command not in .ci/run: {test}"
    assert "train.py" in main_job
