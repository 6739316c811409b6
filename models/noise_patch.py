"""``model=noise_patch``: the example generator (uniform-noise rectangles on normal images); nothing to train."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule

from anomgen.generators.noise_patch import NoisePatchGenerator
from anomgen.seeding import sample_generator


class NoisePatchModel(LightningModule):
    trainable = False  # train.py skips Trainer.fit
    generates = True  # train.py runs Trainer.predict with the export callback

    def __init__(self, min_fraction: float = 0.2, max_fraction: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.generator = NoisePatchGenerator(min_fraction, max_fraction)
        self.generator_name = self.generator.name
        self.seed = seed

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        source = batch["source"]
        images, masks, params = [], [], []
        for j, index in enumerate(batch["index"].tolist()):
            image, mask, p = self.generator(source["image"][j].cpu(), sample_generator(self.seed, index))
            images.append(image)
            masks.append(mask)
            params.append({**p, "seed": self.seed})
        return {
            "index": batch["index"],
            "image": torch.stack(images),
            "mask": torch.stack(masks),
            "label": torch.ones(len(images), dtype=torch.long),
            "generator": self.generator_name,
            "category": list(source["category"]),
            "defect_type": [self.generator_name] * len(images),
            "sources": [[p] for p in source["image_path"]],
            "params": params,
        }
