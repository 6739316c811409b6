"""``model=asyrp``: anomalies by a learned h-space edit of a frozen DDIM (Asyrp; :mod:`anomgen.generators.asyrp`).

Thin wrapper: training prepares each support image once (its x_T and the unedited trajectory's predictions, kept by
``image_path`` for every epoch and for generation); each training step walks the edited trajectory through every
t ≥ t_edit and takes one optimizer step per t on the directional CLIP + L1 loss (manual optimization, as Asyrp's
reference loop does), over :class:`~anomgen.generators.asyrp.DeltaH` only; with K edit timesteps a batch is K
optimizer steps (``trainer.max_steps`` counts them). Training draws nothing at random;
``predict_step`` edits each request's source image with a strength α drawn uniformly from [``alpha_min``,
``alpha_max``] by the sample's own generator (seeded by its global index) and records α in the manifest (``params``).
Checkpoints hold the DeltaH weights only; the frozen UNet and CLIP come from their config.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from lightning.pytorch import LightningModule

from anomgen.data.generation import GeneratedBatch
from anomgen.diffusion.ddim import DEFAULT_BETAS, DDIMSchedule
from anomgen.errors import ConfigError
from anomgen.generators.asyrp import Asyrp
from anomgen.seeding import sample_generator

TRAINABLE_PREFIX = "asyrp.delta_h."


class AsyrpModel(LightningModule):
    trainable = True
    generates = True
    generator_name = "asyrp"

    def __init__(
        self,
        unet: torch.nn.Module,
        clip,
        optimizer,
        num_inference_steps: int = 40,
        alpha_min: float = 0.5,
        alpha_max: float = 1.5,
        betas: Mapping | None = None,
        seed: int = 0,
        **asyrp,
    ) -> None:
        """``asyrp``: the method's hyperparameters (target_text, t_edit, lambda_clip, lambda_l1, hidden_channels,
        time_embed_dim, t_boost, eta_boost), declared with their defaults once, by
        :class:`anomgen.generators.asyrp.Asyrp`."""
        super().__init__()
        if alpha_min > alpha_max:
            raise ConfigError(f"model.alpha_min ({alpha_min}) must not exceed model.alpha_max ({alpha_max})")
        self.save_hyperparameters(ignore=["unet", "clip", "optimizer"])
        schedule = DDIMSchedule(num_inference_steps, **dict(betas or DEFAULT_BETAS))
        self.asyrp = Asyrp(unet, clip, schedule, **asyrp)
        self.optimizer_factory = optimizer
        self.seed = seed
        self.automatic_optimization = False  # one optimizer step per edit timestep, inside the training step
        self.sources: dict[str, torch.Tensor] = {}  # image_path -> (1 + K) × 3 × H × W (CPU), prepared once

    def source_states(self, images: torch.Tensor, image_paths: Sequence[str]) -> torch.Tensor:
        """:meth:`Asyrp.prepare` of the images (B × (1 + K) × 3 × H × W; column 0 is x_T), computing only those not
        seen before."""
        missing = {p: i for i, p in enumerate(image_paths) if p not in self.sources}
        if missing:
            prepared = self.asyrp.prepare(images[list(missing.values())])
            for path, state in zip(missing, prepared):
                self.sources[path] = state.cpu()
        return torch.stack([self.sources[p] for p in image_paths]).to(images.device)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        sources = self.source_states(images, list(batch["image_path"]))
        optimizer = self.optimizers()
        losses, parts_sum = [], {}
        for t, loss, parts in self.asyrp.training_losses(images, sources, categories=list(batch["category"])):
            if not torch.isfinite(loss):
                raise FloatingPointError(f"the Asyrp loss is {loss.item()} at t = {t}, step {self.global_step}; "
                                         "lower the learning rate or check the data")
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            losses.append(loss.detach())
            for name, value in parts.items():
                parts_sum[name] = parts_sum.get(name, 0.0) + value
        loss = torch.stack(losses).mean()  # the mean over the edit timesteps of this batch
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        self.log_dict({f"train/{name}": value / len(losses) for name, value in parts_sum.items()},
                      batch_size=len(images))
        return loss

    def configure_optimizers(self):
        return self.optimizer_factory(params=self.asyrp.delta_h.parameters())

    def predict_step(self, batch: dict, batch_idx: int) -> GeneratedBatch:
        source = batch["source"]
        indices = batch["index"].tolist()
        generators = [sample_generator(self.seed, i) for i in indices]
        low, high = self.hparams.alpha_min, self.hparams.alpha_max
        alphas = [low + (high - low) * float(torch.rand((), generator=g)) for g in generators]
        x_T = self.source_states(source["image"], list(source["image_path"]))[:, 0]
        images = self.asyrp.generate(x_T, alphas, generators)
        categories = list(source["category"])
        texts = self.asyrp.target_texts(categories, len(indices))
        return GeneratedBatch(
            index=batch["index"],
            image=images,
            mask=None,  # a global edit: no anomaly mask
            label=torch.ones(len(indices), dtype=torch.long),
            generator=self.generator_name,
            category=categories,
            defect_type=[self.generator_name] * len(indices),
            sources=[[p] for p in source["image_path"]],
            params=[{"alpha": alpha, "t_edit": self.asyrp.t_edit, "seed": self.seed, "target_text": text,
                     "t_boost": self.asyrp.t_boost} for alpha, text in zip(alphas, texts)],
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only the trainable DeltaH weights."""
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k.startswith(TRAINABLE_PREFIX)}

    def load_state_dict(self, state_dict: Mapping, strict: bool = True, assign: bool = False):
        """Load a checkpoint's DeltaH weights strictly (every DeltaH key, no unknown key); frozen weights, when
        present, load too."""
        own = set(self.state_dict())
        unexpected = sorted(set(state_dict) - own)
        missing = sorted(k for k in own if k.startswith(TRAINABLE_PREFIX) and k not in state_dict)
        if strict and (unexpected or missing):
            raise RuntimeError(f"AsyrpModel checkpoint: missing DeltaH keys {missing}, unexpected keys {unexpected}")
        return super().load_state_dict(state_dict, strict=False, assign=assign)
