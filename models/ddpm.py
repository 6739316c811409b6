"""``model=ddpm``: train the small ε-prediction DDPM of :mod:`anomgen.diffusion.ddpm` as a stage.

Synthetic validation offline needs a frozen diffusion model trained on data disjoint from the task (digits for the
Animal-MNIST tasks). This stage trains it on the images of a datamodule (``datamodule=classification`` on a shipped
dataset; the labels are not used): the loss is :func:`anomgen.diffusion.ddpm.ddpm_loss` over the schedule DDIM later
samples, with an EMA copy of the weights updated after every step. At the end of fitting the EMA UNet is saved as a
diffusers folder, ``<run>/unet``, the run's ``unet`` output (``model.unet.source=${output:ddpm.unet}`` in a later
stage). Steps: ``trainer.max_steps``. Under DDP each rank draws its own timesteps and noises (a generator seeded with
``seed + global_rank``; the global generators reseeded the same way when fitting starts, :mod:`anomgen.distributed`).

    python train.py model=ddpm datamodule=classification datamodule.dataset=digits datamodule.image_size=28 \
      datamodule.augment.kind=null datamodule.augment.flip=false ++trainer.max_steps=1500 trainer.max_epochs=-1
"""

from __future__ import annotations

import copy
import json
from datetime import datetime, timezone
from pathlib import Path

import torch
from lightning.pytorch import LightningModule

from anomgen.diffusion.ddim import DEFAULT_BETAS
from anomgen.diffusion.ddpm import alphas_cumprod, ddpm_loss, ddpm_unet
from anomgen.diffusion.unets import save_diffusion_unet
from anomgen.distributed import rank_generator, seed_process
from anomgen.errors import ConfigError
from anomgen.pixels import to_diffusion_range


class DDPMTraining(LightningModule):
    generates = False

    def __init__(self, image_size: int = 28, channels: int = 3, lr: float = 1e-3, ema_decay: float = 0.995,
                 unet: dict | None = None, seed: int = 0) -> None:
        """``unet``: :data:`anomgen.diffusion.ddpm.SMALL_UNET` fields to change (block_out_channels, ...)."""
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)  # the same initial weights for the same seed, whatever ran before
        self.unet = ddpm_unet(image_size, channels, **dict(unet or {}))
        self.ema = copy.deepcopy(self.unet).requires_grad_(False)  # no dropout: its mode does not matter
        self.register_buffer("alpha_bars", alphas_cumprod(**DEFAULT_BETAS), persistent=False)
        self.stage_outputs: dict = {}
        self._noise: torch.Generator | None = None  # this rank's timesteps and noises (on_fit_start)

    def on_fit_start(self) -> None:
        """Per-rank training randomness (``seed + global_rank``): ``seed_everything`` gave every rank the same
        global state, so without this every rank would draw the same timesteps, noises and dropout masks. The loss
        draws on the CPU and moves the draws to the device."""
        self._noise = rank_generator(self.hparams.seed, self.global_rank)
        seed_process(self.hparams.seed, self.global_rank)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        if tuple(images.shape[-2:]) != (self.hparams.image_size,) * 2:
            raise ConfigError(f"DDPM stage: images are {tuple(images.shape[-2:])}, the UNet is "
                              f"{self.hparams.image_size}²: set datamodule.image_size={self.hparams.image_size}")
        loss = ddpm_loss(self.unet, to_diffusion_range(images), self.alpha_bars, self._noise)  # each rank its own
        if not torch.isfinite(loss):
            raise FloatingPointError(f"DDPM training: loss is {loss.item()} at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(images))
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)  # as anomgen.diffusion.ddpm.train_ddpm

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        with torch.no_grad():
            for p_ema, p in zip(self.ema.parameters(), self.unet.parameters()):
                p_ema.lerp_(p, 1.0 - self.hparams.ema_decay)

    def configure_optimizers(self):
        return torch.optim.Adam(self.unet.parameters(), lr=self.hparams.lr)

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero:
            folder = save_diffusion_unet(self.ema, Path(self.trainer.default_root_dir) / "unet")
            describe = getattr(self.trainer.datamodule, "describe", None)
            info = {"stage": "ddpm", **(describe() if describe else {}), "image_size": self.hparams.image_size,
                    "steps": int(self.global_step), "lr": self.hparams.lr, "ema_decay": self.hparams.ema_decay,
                    "seed": self.hparams.seed, **DEFAULT_BETAS,
                    "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            (folder / "anomgen_training.json").write_text(json.dumps(info, indent=2, default=str))
            self.stage_outputs = {"unet": str(folder.resolve())}
        self.trainer.strategy.barrier("ddpm_saved")
