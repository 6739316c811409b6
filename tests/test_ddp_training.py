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


def _runs(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "logs" / "train" / "runs").iterdir() if p.is_dir())


@pytest.mark.slow  # two 2-process runs (about 60 s here); pytest -m slow runs it
def test_sde_job_on_two_devices_one_run_folder_one_set_and_a_checkpoint_that_resumes(tmp_path):
    """``trainer.devices=2`` alone (no trainer=ddp): DDP with 2 gloo processes; one run folder, written by rank 0;
    the FID checks run on both ranks (each samples half of a check's images, seeded by index, the features are
    gathered, and both take rank 0's decision); the exported set has every sample once; and the checkpoint resumes on
    2 processes where it stopped."""
    import torch

    from anomgen.data.synthetic import read_manifest

    common = ("experiment=sde_digits", "debug=tiny", "trainer.devices=2", "model.num_steps=4",
              "callbacks.fid_early_stopping.every_n_steps=2", "callbacks.fid_early_stopping.num_samples=16",
              "+callbacks.fid_early_stopping.batch_size=16")
    _train(tmp_path, *common, "trainer.max_epochs=1", f"synthetic_set_dir={tmp_path / 'first'}")
    (run,) = _runs(tmp_path)
    outputs = json.loads((run / "run.json").read_text())["outputs"]
    rows = read_manifest(outputs["synthetic_set"])
    assert [r["id"] for r in rows] == [f"{i:06d}" for i in range(8)]  # every sample exactly once
    assert json.loads((Path(outputs["synthetic_set"]) / "set.json").read_text())["world_size"] == 2
    assert not list(run.glob(".pl_hydra_rank_*/run.json")) and not list(run.glob("*/run.json"))
    first = torch.load(outputs["checkpoint"], map_location="cpu", weights_only=False)
    assert first["global_step"] == 3 and first["epoch"] == 0  # 3 batches a rank (limit_train_batches)
    (fid_state,) = [v for k, v in first["callbacks"].items() if k.startswith("FIDEarlyStopping")]
    assert [s for s, _ in fid_state["curve"]] == [2]

    _train(tmp_path, *common, "trainer.max_epochs=2", f"ckpt_path={outputs['checkpoint']}",
           f"synthetic_set_dir={tmp_path / 'resumed'}")
    resumed_run = [r for r in _runs(tmp_path) if r != run]
    assert len(resumed_run) == 1, _runs(tmp_path)
    resumed = json.loads((resumed_run[0] / "run.json").read_text())["outputs"]
    last = torch.load(resumed["checkpoint"], map_location="cpu", weights_only=False)
    assert last["global_step"] == 6 and last["epoch"] == 1  # continued from step 3, not from 0
    (fid_state,) = [v for k, v in last["callbacks"].items() if k.startswith("FIDEarlyStopping")]
    assert [s for s, _ in fid_state["curve"]] == [2, 4, 6]  # the FID schedule continued too
    assert len(read_manifest(resumed["synthetic_set"])) == 8


def test_more_gpus_than_the_machine_has_is_one_clear_error(tmp_path):
    """On a machine without enough GPUs the run stops before any work with one message naming trainer.devices."""
    import torch

    if torch.cuda.device_count() >= 64:
        pytest.skip("this machine has 64 GPUs")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), f"paths.log_dir={tmp_path / 'logs'}", "logger=none",
                          "experiment=sde_digits", "trainer.accelerator=gpu", "trainer.devices=64"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 1
    assert f"error: trainer.devices=64 asks for 64 GPUs, but this machine has {torch.cuda.device_count()}" \
        in out.stderr, out.stderr[-2000:]
    assert "Traceback" not in out.stderr


# -- pipelines under DDP: stages on rank 0 alone, every rank waits for the records ---------------------------------


@pytest.mark.parametrize("stage, rank, runs", [
    ({"overrides": []}, 0, True), ({"overrides": []}, 1, True),                    # a DDP stage: every rank
    ({"overrides": [], "rank_zero": True}, 0, True), ({"overrides": [], "rank_zero": True}, 1, False),
    ({"entry": "evaluate"}, 0, True), ({"entry": "evaluate"}, 3, False),            # evaluate: rank 0 alone
])
def test_a_stage_runs_on_the_ranks_it_should_and_every_rank_then_waits(monkeypatch, stage, rank, runs):
    """Before, every rank pretrained the cached backbone (``rank_zero`` stages) and evaluated, and no rank waited for
    rank 0's record of a stage before resolving the next stage's ``${output:...}`` from it."""
    import evaluate
    import train

    calls = []
    monkeypatch.setattr(train, "process_rank", lambda: rank)
    monkeypatch.setattr(train, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(train, "run_stage", lambda cfg: calls.append("train"))
    monkeypatch.setattr(evaluate, "evaluate", lambda cfg: calls.append("evaluate"))
    train.run_entry(None, stage)
    assert calls == ([stage.get("entry", "train")] if runs else []) + ["barrier"]


def test_a_rank_zero_stage_is_composed_on_one_device(tmp_path):
    import train

    stage = {"overrides": ["~experiment", "model=noise_patch", "trainer=ddp"], "rank_zero": True}
    cfg = train.compose_stage(stage, ["trainer.devices=4"], tmp_path, tmp_path / "stage")
    assert cfg.trainer.devices == 1 and cfg.trainer.strategy == "auto"
    cfg = train.compose_stage({**stage, "rank_zero": False}, ["trainer.devices=4"], tmp_path, tmp_path / "stage")
    assert cfg.trainer.devices == 4 and cfg.trainer.strategy == "ddp"


@pytest.mark.slow  # the default FITYMI pipeline on 2 processes (about 2.5 min here); pytest -m slow runs it
def test_the_users_command_runs_the_default_pipeline_on_two_processes(tmp_path):
    """``python train.py model=sde_nearnd trainer.devices=2`` (the README's command, 2 instead of 4 CPU processes):
    the backbone stage runs on rank 0 alone before the SDE stage starts the second process, which finds it finished;
    before, the second process resolved the OE stage's ``${output:sde.synthetic_set}`` before rank 0 had written it
    and the run failed."""
    cache = tmp_path / "cache"
    _train(tmp_path, "model=sde_nearnd", "trainer.devices=2", "debug=tiny", f"paths.cache_dir={cache}", timeout=600)
    (run,) = _runs(tmp_path)
    record = json.loads((run / "run.json").read_text())
    assert record["complete"] and set(record["stages"]) == {"backbone", "sde", "oe", "evaluate"}
    outputs = record["outputs"]
    assert Path(outputs["backbone.backbone"]).is_file() and Path(outputs["oe.backbone"]).is_file()
    assert json.loads((Path(outputs["sde.synthetic_set"]) / "set.json").read_text())["world_size"] == 2
    assert Path(outputs["evaluate.report"]).is_file()
