"""DDP that trains correctly, through the real command line (2 gloo processes on the CPU): each rank draws its own
training noise, and the SDE job keeps one run folder, one exported set and a checkpoint that resumes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROBES = ROOT / "tests" / "probes"  # noise_probe.NoiseProbe: a test-only callback, imported from this folder


def _train(tmp_path: Path, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(PROBES), os.environ.get("PYTHONPATH")) if p)}
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), f"paths.log_dir={tmp_path / 'logs'}", "logger=none",
                          *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


def test_each_rank_draws_its_own_noise_and_the_loss_falls(tmp_path):
    """Every rank starts from seed_everything(seed); before the per-rank generators both ranks drew the same times t
    and noises z at every step (N devices averaged N copies of one draw)."""
    probe = tmp_path / "probe"
    _train(tmp_path, "experiment=sde_digits", "debug=tiny", "trainer.devices=2", "generate=false",
           "~callbacks.fid_early_stopping", "+callbacks.probe._target_=noise_probe.NoiseProbe",
           f"+callbacks.probe.path={probe}", "trainer.max_epochs=-1", "+trainer.max_steps=30",
           "trainer.limit_train_batches=null", "model.warmup_steps=1", "model.optimizer.lr=2e-3")
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["t"] != ranks[1]["t"], "both ranks drew the same diffusion times at step 0"
    assert ranks[0]["z"] != ranks[1]["z"], "both ranks drew the same noise at step 0"
    for rank in ranks:
        losses = rank["losses"]
        assert len(losses) == 30
        assert sum(losses[-10:]) / 10 < 0.75 * sum(losses[:10]) / 10, losses
