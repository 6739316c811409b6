"""A 2-process CPU DDP run exports exactly the set a 1-process run exports (samples seeded by global index)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from anomgen.data.synthetic import read_manifest

ROOT = Path(__file__).resolve().parent.parent


def _export(tmp_path: Path, name: str, *overrides: str, experiment: str = "noise_patch_digits",
            env: dict | None = None) -> Path:
    set_dir = tmp_path / name
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **(env or {})}
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"paths.log_dir={tmp_path / 'logs'}", "logger=none",
         f"experiment={experiment}", "datamodule.num_generated=45", "datamodule.eval_batch_size=8",
         f"synthetic_set_dir={set_dir}", *overrides],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    return set_dir


def test_two_process_ddp_export_equals_one_process(tmp_path):
    single = _export(tmp_path, "single", "trainer=cpu")
    ddp = _export(tmp_path, "ddp", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    rows_single, rows_ddp = read_manifest(single), read_manifest(ddp)
    assert [r["id"] for r in rows_single] == [f"{i:06d}" for i in range(45)]  # every sample exactly once
    assert rows_ddp == rows_single
    for row in rows_single:
        for key in ("image", "mask"):
            assert (single / row[key]).read_bytes() == (ddp / row[key]).read_bytes(), f"{row['id']} {key} differs"
    info_single, info_ddp = (json.loads((d / "set.json").read_text()) for d in (single, ddp))
    assert info_ddp["world_size"] == 2 and info_single["world_size"] == 1
    assert info_ddp["counts"] == info_single["counts"]
    assert not list(tmp_path.glob(".ddp.shard-*")), "shards must be gone after the merge"
    runs = sorted((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 2, f"one run folder per run (rank 0 creates it), got {[r.name for r in runs]}"
    assert all((r / "metrics.json").is_file() for r in runs)


def test_diffstyle_set_is_the_same_on_two_processes(tmp_path):
    """DiffStyle under DDP: each rank inverts what its batches need; every sample is seeded by its index, so the set
    equals the 1-process set (pixels up to one 8-bit level: batched float sums differ in the last bits)."""
    common = ("model=diffstyle", "debug=tiny", "trainer.limit_predict_batches=1.0", "model.n_style=3",
              "model.n_content=3", "model.n_held_out=5")
    single = _export(tmp_path, "single", *common, "trainer.devices=1")
    ddp = _export(tmp_path, "ddp", *common, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    rows_single, rows_ddp = read_manifest(single), read_manifest(ddp)
    assert [r["label"] for r in rows_single] == [1] * 9 + [0] * 5
    assert rows_ddp == rows_single
    _same_images(single, ddp, rows_single)


def _same_images(a: Path, b: Path, rows: list[dict]) -> None:
    import numpy as np
    from PIL import Image

    for row in rows:
        x = np.asarray(Image.open(a / row["image"]), dtype=np.int16)
        y = np.asarray(Image.open(b / row["image"]), dtype=np.int16)
        assert np.abs(x - y).max() <= 1, row["id"]


def test_sde_export_from_one_checkpoint_is_the_same_on_two_processes(tmp_path):
    """FITYMI's generator under DDP: trained once, then exported again from its checkpoint (fit=false ckpt_path=...)
    on 1 and on 2 processes; every sample is seeded by its global index, so the sets agree (and with the export
    made right after fitting)."""
    common = ("debug=limit", "datamodule.num_generated=12", "model.num_steps=10", "callbacks=default")
    trained = _export(tmp_path, "trained", *common, "trainer.devices=1", experiment="sde_digits")
    (ckpt,) = (tmp_path / "logs" / "train" / "runs").glob("*/checkpoints/last.ckpt")
    again = (*common, "fit=false", f"ckpt_path={ckpt}")
    single = _export(tmp_path, "single", *again, "trainer.devices=1", experiment="sde_digits")
    ddp = _export(tmp_path, "ddp", *again, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                  experiment="sde_digits")
    rows = read_manifest(single)
    assert [r["id"] for r in rows] == [f"{i:06d}" for i in range(12)]
    assert read_manifest(ddp) == rows
    assert [r["sources"] for r in read_manifest(trained)] == [r["sources"] for r in rows]
    _same_images(single, ddp, rows)
    _same_images(single, trained, rows)


def test_baseline_noise_set_is_the_same_on_two_processes(tmp_path):
    """A baseline validation set (model=noise_set) under DDP: the same plan on every rank, each anomaly seeded by its
    index, so the set equals the 1-process set byte for byte, held-out normals included."""
    common = ("model=noise_set", "model.n_style=3", "model.n_content=3", "model.n_held_out=5")
    single = _export(tmp_path, "single", *common, "trainer=cpu")
    ddp = _export(tmp_path, "ddp", *common, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    rows = read_manifest(single)
    assert [r["label"] for r in rows] == [1] * 9 + [0] * 5
    assert read_manifest(ddp) == rows
    for row in rows:
        assert (single / row["image"]).read_bytes() == (ddp / row["image"]).read_bytes(), row["id"]


@pytest.mark.slow  # three processes start and import the stack (about 25 s); pytest -m slow runs it
def test_adp_concept_stage_learns_one_concept_on_two_processes(tmp_path):
    """The concept stage under 2-process DDP: the token table's gradient is averaged over the ranks (the stage checks
    that every rank ends with the same vectors, and fails otherwise), and rank 0 writes the one concept file."""
    from anomgen.encoders.clip_text import load_concepts

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"paths.log_dir={tmp_path / 'logs'}", "logger=none", "~experiment",
         "model=adp_concept", "datamodule=mvtec", "debug=tiny", "callbacks=none", "trainer=ddp",
         "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=-1", "+trainer.max_steps=3",
         "trainer.limit_train_batches=1.0", "trainer.enable_checkpointing=false",
         "datamodule.k_shot=2", "datamodule.validation=none", "datamodule.train_repeats=4", "datamodule.batch_size=2",
         "datamodule.dataset.image_size=32", f"hydra.run.dir={run}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    record = json.loads((run / "run.json").read_text())
    assert list(load_concepts(record["outputs"]["concept"])) == ["<adp-n>"]


@pytest.mark.slow  # four processes start and import the stack (about 40 s); pytest -m slow runs it
@pytest.mark.parametrize("stage", ["anomalydiffusion_embedding", "anomalydiffusion_masks"])
def test_anomalydiffusion_training_stages_learn_one_file_on_two_processes(tmp_path, stage):
    """AnomalyDiffusion's two training stages under 2-process DDP: the learned vectors are a submodule, so their
    gradients are averaged over the ranks (the stage checks that every rank ends with the same parameters, and fails
    otherwise), and rank 0 writes the one file, of the category's two defect types."""
    from anomgen.generators.anomalydiffusion import read_file_info

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    run = tmp_path / "run"
    sizes = (["model.num_type_tokens=1", "model.num_mask_tokens=1",
              "model.encoder={channels: [8, 8, 16, 16], head_channels: 16}"] if stage.endswith("embedding")
             else ["model.num_vectors=2"])
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), f"paths.log_dir={tmp_path / 'logs'}", "logger=none", "~experiment",
         f"model={stage}", "datamodule=mvtec", "debug=tiny", "callbacks=none", "trainer=ddp",
         "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_epochs=-1", "+trainer.max_steps=2",
         "trainer.limit_train_batches=1.0", "trainer.enable_checkpointing=false", "datamodule.dataset.image_size=32",
         "datamodule.anomaly_train_fraction=0.5", "datamodule.train_on=anomaly_train", "datamodule.batch_size=1",
         *sizes, f"hydra.run.dir={run}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    outputs = json.loads((run / "run.json").read_text())["outputs"]
    (product,) = [v for k, v in outputs.items() if k in ("embedding", "masks")]
    info = read_file_info(product)
    assert info["type_names"] == ["broken", "crack"] and info["info"]["category"] == "bottle"


def test_anomalydiffusion_pairs_are_the_same_on_two_processes(tmp_path):
    """AnomalyDiffusion's generation stage under DDP (from an embedding and a mask file): each pair is seeded by its
    index and each mask drawn alone, so the manifest (types, normal images, seeds, mask tries, templates) and the mask
    PNGs equal the 1-process set byte for byte; images up to one 8-bit level (batched UNet passes)."""
    import torch

    from anomgen.generators.anomalydiffusion import AnomalyEmbedding, save_anomaly_embedding
    from anomgen.generators.anomalydiffusion_masks import MaskEmbedding, save_mask_embedding

    types, info = ["broken", "crack"], {"category": "bottle"}  # the tiny MVTec layout's; the tiny LDM's width 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        embedding = save_anomaly_embedding(tmp_path / "embedding.safetensors", AnomalyEmbedding(
            2, 32, 1, 1, init=torch.randn(32), resolution=32,
            encoder={"channels": (8, 8, 16, 16), "head_channels": 16}, type_names=types), info)
        masks = save_mask_embedding(tmp_path / "masks.safetensors",
                                    MaskEmbedding(types, 32, 2, init=torch.randn(2, 32)), info)
    common = ("model=anomalydiffusion", "debug=tiny", "logger=none", "datamodule.dataset.image_size=32",
              f"model.embedding={embedding}", f"model.masks={masks}", "model.num_per_type=3", "model.steps=3",
              "model.mask_steps=3", "model.mask_threshold=0.3", "trainer.limit_predict_batches=1.0")
    one_thread = {"OMP_NUM_THREADS": "1"}  # 2 processes on 2 busy cores: one thread each
    single = _export(tmp_path, "single", *common, "trainer.devices=1", experiment="noise_patch_mvtec", env=one_thread)
    ddp = _export(tmp_path, "ddp", *common, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                  experiment="noise_patch_mvtec", env=one_thread)
    rows = read_manifest(single)
    assert [r["id"] for r in rows] == [f"{i:06d}" for i in range(6)]
    assert [r["defect_type"] for r in rows] == ["broken", "crack"] * 3
    assert read_manifest(ddp) == rows
    for row in rows:
        assert row["mask"] is not None
        assert (single / row["mask"]).read_bytes() == (ddp / row["mask"]).read_bytes(), f"{row['id']} mask differs"
    _same_images(single, ddp, rows)
