"""What a person reads: each log line once on the console and once in the run's ``train.log``, no adverts."""

from __future__ import annotations

import json
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


def test_train_log_holds_the_stages_and_their_events(cli_run):
    """train.log (Hydra's job log in the run folder) tells the run: each stage's start and end, the export, the
    outlier-exposure summary, the evaluation's figures; the console shows the same lines."""
    stdout, stderr, run_dir = cli_run
    logged = _log_messages(run_dir / "train.log")
    record = json.loads((run_dir / "pipeline.json").read_text())
    assert record["order"] == ["backbone", "sde", "oe", "evaluate"]
    for number, name in enumerate(record["order"], start=1):
        folder = record["stages"][name]
        label = f"stage {number}/4 {name!r}"
        assert sum(m.startswith(f"{label} (") and m.endswith(f"): started in {folder}") for m in logged) == 1, logged
        assert sum(re.fullmatch(rf"{re.escape(label)}: done in \d+ s", m) is not None for m in logged) == 1, logged
    assert any(m.startswith("stage 2/4 'sde' (model=SDENearND): started in ") for m in logged), logged
    assert any(m.startswith("stage 4/4 'evaluate' (evaluate): started in ") for m in logged), logged
    assert f"exported 8 samples to {run_dir / 'sde' / 'synthetic_set'}" in logged, logged
    assert sum(m.startswith("OE: 1 epoch, 1 step, ") and "val acc" in m for m in logged) == 1, logged
    assert any(re.fullmatch(r"knn_pixels: test image AUROC \d\.\d{4}", m) for m in logged), logged
    console = stdout + stderr
    assert "exported 8 samples to" in console and "stage 4/4 'evaluate': done in" in console


def test_no_progress_bars_without_a_terminal(cli_run):
    """Bars (Lightning's for fit and predict, the project's tqdm ones for features) are for a terminal; in a log
    they are noise (ANOMGEN_PROGRESS=1 brings them back: tests/test_progress.py)."""
    stdout, stderr, _ = cli_run
    for bar in ("Predicting", "Epoch 0/0", "it/s", ": bank", ": score"):
        assert bar not in stdout + stderr, bar


def test_fid_checks_say_what_they_found_and_when_they_stop(tmp_path, caplog, capsys, monkeypatch, one_thread):
    import functools

    import torch
    from lightning.pytorch import Trainer

    from anomgen.data import Digits
    from anomgen.diffusion import tiny_score_unet
    from anomgen.encoders import RawPixels
    from callbacks import FIDEarlyStopping
    from datamodules import AnomalyDataModule
    from models.sde_nearnd import SDENearND

    torch.manual_seed(0)
    model = SDENearND(unet=tiny_score_unet("vp", image_size=8, channels=1), sde={"kind": "vp"},
                      optimizer=functools.partial(torch.optim.Adam, lr=2e-3), warmup_steps=1, num_steps=2,
                      corrector_steps=1, seed=0)
    fid = FIDEarlyStopping(RawPixels(), every_n_steps=2, num_samples=8, target=1e9, bands=[[None, None]],
                           export_dir=str(tmp_path / "bands"), export_size=3)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=10, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[fid])
    monkeypatch.setenv("ANOMGEN_PROGRESS", "1")  # the sampling of a check has a bar (on a terminal)
    with caplog.at_level(logging.INFO, logger="callbacks"):
        trainer.fit(model, datamodule=AnomalyDataModule(dataset=functools.partial(Digits), normal_class="3",
                                                        batch_size=16))
    value = fid.stopped_at[1]
    messages = [r.getMessage() for r in caplog.records if r.name == "callbacks.fid_early_stopping"]
    band = tmp_path / "bands" / "fid_0-inf"
    assert messages == [f"FID {value:.2f} ≤ target 1000000000.00 at step 2: stopping",
                        f"FID {value:.2f} in band fid_0-inf at step 2: exported 3 samples to {band}"]
    err = capsys.readouterr().err
    assert "FID check: sampling" in err and "FID band fid_0-inf: sampling" in err
