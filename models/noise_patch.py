"""``model=noise_patch``: the example generator (uniform-noise rectangles on normal images); nothing to train."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule

from anomgen.data.generation import GeneratedBatch
from anomgen.generators.noise_patch import NoisePatchGenerator
from anomgen.seeding import sample_generator


class NoisePatchModel(LightningModule):
    trainable = False  # train.py skips Trainer.fit
    generates = True  # train.py runs Trainer.predict with the export callback

    def __init__(self, seed: int = 0, **noise_patch) -> None:
        """``noise_patch``: :class:`~anomgen.generators.noise_patch.NoisePatchGenerator`'s arguments (min_fraction,
        max_fraction), with its defaults."""
        super().__init__()
        self.save_hyperparameters()
        self.generator = NoisePatchGenerator(**noise_patch)
        self.generator_name = self.generator.name
        self.seed = seed

    def predict_step(self, batch: dict, batch_idx: int) -> GeneratedBatch:
        source = batch["source"]
        images, masks, params = [], [], []
        for j, index in enumerate(batch["index"].tolist()):
            image, mask, p = self.generator(source["image"][j].cpu(), sample_generator(self.seed, index))
            images.append(image)
            masks.append(mask)
            params.append({**p, "seed": self.seed})
        return GeneratedBatch(
            index=batch["index"],
            image=torch.stack(images),
            mask=torch.stack(masks),
            label=torch.ones(len(images), dtype=torch.long),
            generator=self.generator_name,
            category=list(source["category"]),
            defect_type=[self.generator_name] * len(images),
            sources=[[p] for p in source["image_path"]],
            params=params,
        )
