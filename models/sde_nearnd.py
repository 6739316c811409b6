"""``model=sde_nearnd``: a score-SDE trained on the normal class only; its early samples are near-anomalies (FITYMI).

Thin wrapper: the SDE, the loss, the samplers and the EMA live in :mod:`anomgen.diffusion`. Training minimises the
denoising score-matching loss on images in [-1, 1]; sampling (``sample`` for the FID callback, ``predict_step`` for
the export callback) uses the EMA weights and one generator per sample, seeded by its global index. The EMA is
updated right after each optimizer step, so a check at step N samples with the EMA of N updates.

Under DDP (``trainer.devices=N``): each rank draws its own training times and noises (a generator seeded with
``seed + global_rank``, :mod:`anomgen.distributed`), so the averaged gradient is over N different draws, not N copies
of one. The FID check (``callbacks.FIDEarlyStopping``) is not split over the ranks: every rank samples all of a
check's images, each seeded by its index, with the same (synchronised) weights, so every rank computes the same FID
and takes the same stopping decision without communicating; a band's set is written by rank 0 while the others wait.
The export is split: each rank samples its share of the indices and rank 0 merges the shards.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule

from anomgen.data.generation import GeneratedBatch
from anomgen.diffusion import (
    EMA,
    dsm_loss,
    euler_maruyama_sample,
    make_sde,
    pc_sample,
    score_fn_from_unet,
)
from anomgen.distributed import rank_generator, seed_process
from anomgen.errors import ConfigError
from anomgen.pixels import from_diffusion_range, to_diffusion_range
from anomgen.seeding import sample_generator

SAMPLERS = ("pc", "euler_maruyama")


class SDENearND(LightningModule):
    trainable = True
    generates = True
    generator_name = "sde_nearnd"

    def __init__(
        self,
        unet: torch.nn.Module,
        sde: dict,
        optimizer,
        warmup_steps: int = 5000,
        ema_decay: float = 0.999,
        sampler: str = "pc",
        snr: float = 0.16,
        corrector_steps: int = 1,
        num_steps: int | None = None,
        likelihood_weighting: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if sampler not in SAMPLERS:
            raise ConfigError(f"model.sampler must be one of {SAMPLERS}, got {sampler!r}")
        self.save_hyperparameters(ignore=["unet", "optimizer"])
        self.unet = unet
        self.sde = make_sde(**sde)
        self.optimizer_factory = optimizer
        self.ema = EMA(self.unet, decay=ema_decay)
        self.seed = seed
        self.last_fid: float | None = None  # set by the FID callback; recorded with exported samples
        self._noise: torch.Generator | None = None  # the training draws of this rank (on_fit_start)

    def on_fit_start(self) -> None:
        """Per-rank training randomness: the loss's times and noises come from this rank's generator
        (``seed + global_rank``), and the global generators are reseeded the same way, because dropout masks (and
        anything else drawn while training) come from them and ``seed_everything`` gave every rank the same state."""
        self.ema.to(self.device)
        self._noise = rank_generator(self.seed, self.global_rank, self.device)
        seed_process(self.seed, self.global_rank)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, *size)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        x0 = to_diffusion_range(batch["image"])
        if x0.shape[1] != self.unet.config.in_channels:  # grey data, one-channel model
            x0 = x0.mean(dim=1, keepdim=True)
        loss = dsm_loss(score_fn_from_unet(self.unet, self.sde), x0, self.sde, self._noise,
                        likelihood_weighting=self.hparams.likelihood_weighting)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the score-matching loss is {loss.item()} at step {self.global_step}; "
                                     "lower the learning rate or check the data")
        self.log("train/loss", loss, prog_bar=True, batch_size=len(x0))
        return loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        """The optimizer step, then the EMA update: every hook that runs after the step (the callbacks'
        ``on_train_batch_end``, where the FID check and step checkpoints run, comes before the module's own) sees
        the EMA of the weights after this step, not one update behind. Once per optimizer step, so gradient
        accumulation does not update it on every micro-batch."""
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.ema.update(self.unet)

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.unet.parameters())
        warmup = max(1, self.hparams.warmup_steps)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    @torch.no_grad()
    def sample(self, indices: list[int], seed: int | None = None) -> torch.Tensor:
        """Images in [0, 1] (B × 3 × H × W) for the given global indices, with the EMA weights."""
        seed = self.seed if seed is None else seed
        generators = [sample_generator(seed, i, self.device) for i in indices]
        shape = (len(indices), *self.image_shape)
        score_fn = score_fn_from_unet(self.unet, self.sde)
        with self.ema.average_parameters(self.unet):
            if self.hparams.sampler == "pc":
                x = pc_sample(score_fn, self.sde, shape, generators, snr=self.hparams.snr,
                              n_steps_corrector=self.hparams.corrector_steps, num_steps=self.hparams.num_steps,
                              progress=False, device=self.device)
            else:
                x = euler_maruyama_sample(score_fn, self.sde, shape, generators, num_steps=self.hparams.num_steps,
                                          progress=False, device=self.device)
        images = from_diffusion_range(x)
        return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images

    def predict_step(self, batch: dict, batch_idx: int) -> GeneratedBatch:
        indices = batch["index"].tolist()
        images = self.sample(indices)
        categories = list(batch["source"]["category"])
        return GeneratedBatch(
            index=batch["index"],
            image=images,
            mask=None,
            label=torch.ones(len(indices), dtype=torch.long),
            generator=self.generator_name,
            category=categories,
            defect_type=[self.generator_name] * len(indices),
            sources=[[] for _ in indices],  # sampled from the model, not edited from a support image
            params=[{"seed": self.seed, "step": self.global_step, "sde": self.sde.kind, "fid": self.last_fid}
                    for _ in indices],
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])
