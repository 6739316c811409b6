"""What a person reads: each log line once on the console and once in the run's ``train.log``, no adverts."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from anomgen.runtime import DropLightningAdverts, tidy_lightning_logging

ROOT = Path(__file__).resolve().parent.parent
#: Hydra's job-logging format: "[time][logger][LEVEL] - message"
HYDRA_LINE = re.compile(r"^\[[^\]]+\]\[(?P<name>[^\]]+)\]\[(?P<level>[A-Z]+)\] - (?P<message>.*)$")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """`python train.py` (the default job: the FITYMI pipeline, tiny, one batch per stage) as a user runs it, without a
    terminal: (stdout, stderr, run folder)."""
    tmp = tmp_path_factory.mktemp("console")
    env = {k: v for k, v in os.environ.items() if k != "ANOMGEN_PROGRESS"}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="offline", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), f"paths.log_dir={tmp / 'logs'}",
                          f"paths.cache_dir={tmp / 'cache'}", "debug=tiny", "+trainer.fast_dev_run=true", "logger=none",
                          "model.num_steps=10"], cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout, out.stderr, Path(out.stdout.strip().splitlines()[-1])


def _log_messages(path: Path) -> list[str]:
    return [m.group("message") for line in path.read_text().splitlines() if (m := HYDRA_LINE.match(line))]


def test_each_log_line_is_printed_once(cli_run):
    """Lightning's own console handler (``INFO: ...`` on stderr) used to print every line a second time beside
    Hydra's; now a line is on the console as often as it is in train.log (once per stage that logs it)."""
    stdout, stderr, run_dir = cli_run
    console = (stdout + stderr).splitlines()
    logged = _log_messages(run_dir / "train.log")
    for message in ("Seed set to 0", "GPU available: False, used: False", "TPU available: False, using: 0 TPU cores"):
        in_file = logged.count(message)
        assert in_file >= 1, f"{message!r} is not in train.log"
        assert sum(line.endswith(message) for line in console) == in_file, message
    assert not any(line.startswith("INFO: ") for line in console), stderr[-2000:]


def test_lightning_s_litlogger_tip_is_not_shown(cli_run):
    stdout, stderr, run_dir = cli_run
    for text in (stdout, stderr, (run_dir / "train.log").read_text()):
        assert "litlogger" not in text


def test_tidy_lightning_logging_keeps_lightning_s_handler_without_root_handlers(monkeypatch):
    """Used as a library (no handler on the root logger), Lightning keeps its console handler: its lines still show."""
    import lightning  # noqa: F401 - adds Lightning's handler

    root, lightning_logger = logging.getLogger(), logging.getLogger("lightning")
    monkeypatch.setattr(root, "handlers", [])
    handler = logging.StreamHandler()
    monkeypatch.setattr(lightning_logger, "handlers", [handler])
    tidy_lightning_logging()
    assert lightning_logger.handlers == [handler]
    record = logging.LogRecord("lightning.pytorch.utilities.rank_zero", logging.INFO, __file__, 1,
                               "💡 Tip: ... try installing [litlogger](https://pypi.org/project/litlogger/) ...", None,
                               None)
    assert not DropLightningAdverts().filter(record)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    assert sum(isinstance(f, DropLightningAdverts) for f in rank_zero.filters) == 1
    tidy_lightning_logging()  # idempotent
    assert sum(isinstance(f, DropLightningAdverts) for f in rank_zero.filters) == 1
