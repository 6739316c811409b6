"""What the benchmark scripts share: one ``train.py`` run in a subprocess, and a JSON-lines results file.

A table script appends one row per run to its results file as soon as the run ends and skips what is already
there, so that an interrupted grid continues where it stopped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_pipeline(log_dir: Path, *overrides: str, env: dict | None = None) -> tuple[Path, dict]:
    """One ``python train.py`` run (CSV logger, runs under ``log_dir``): (its run folder, its ``metrics.json``). A
    failed run is a ``RuntimeError`` with the end of its stderr."""
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), f"paths.log_dir={log_dir}", "logger=csv",
                          *overrides], capture_output=True, text=True, cwd=ROOT, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"train.py {' '.join(overrides)} failed:\n{out.stderr[-3000:]}")
    run_dir = Path(out.stdout.strip().splitlines()[-1])
    return run_dir, json.loads((run_dir / "metrics.json").read_text())


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSON-lines results file (none when it does not exist)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def append_rows(path: Path, rows) -> None:
    """Append ``rows`` (dicts) to the JSON-lines file ``path``, one line each (its folder made when missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
