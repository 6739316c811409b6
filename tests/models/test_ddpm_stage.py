"""model=ddpm: the small DDPM trained as a stage; its EMA weights are the run's `unet` output."""

from __future__ import annotations

import json

import torch


def test_ddpm_stage_trains_and_saves_the_ema_unet(tmp_path, one_thread):
    from lightning.pytorch import Trainer

    from anomgen.diffusion.unets import load_diffusion_unet
    from datamodules.classification import ClassificationDataModule
    from models.ddpm import DDPMTraining

    dm = ClassificationDataModule("digits", max_images=32, batch_size=16, image_size=16,
                                  augment={"kind": None, "flip": False})
    model = DDPMTraining(image_size=16, ema_decay=0.5, unet={"block_out_channels": (16, 16), "attn_resolutions": ()})
    start = {k: v.clone() for k, v in model.unet.state_dict().items()}
    Trainer(accelerator="cpu", max_steps=3, max_epochs=-1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path).fit(model, dm)
    folder = model.stage_outputs["unet"]
    saved = load_diffusion_unet(folder).state_dict()
    ema = model.ema.state_dict()
    assert saved.keys() == ema.keys() and all(torch.equal(saved[k], ema[k]) for k in saved)
    trained = model.unet.state_dict()
    moved = [k for k in ema if not torch.equal(ema[k], start[k])]
    assert moved and any(not torch.equal(ema[k], trained[k]) for k in moved)  # an average, not the last weights
    info = json.loads((tmp_path / "unet" / "anomgen_training.json").read_text())
    assert info["steps"] == 3 and info["dataset"] == "digits" and info["num_train_timesteps"] == 1000
