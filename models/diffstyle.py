"""``model=diffstyle``: a DiffStyle synthetic validation set from the support set (inference only).

``python train.py model=diffstyle`` skips fitting and runs prediction with the export callback: the set holds the
S × C anomalies (label 1) and the held-out normals (label 0), so that it is a validation set on its own. The
algorithm is :mod:`anomgen.generators.diffstyle`; this wrapper plans the requests, inverts each style / content image
the first time a batch needs it (so each image is inverted once per process) and returns generated batches.
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningModule
from torch import nn

from anomgen.data.record import GOOD
from anomgen.generators.diffstyle import DiffStyle, DiffStylePlan, Inversion
from anomgen.pixels import resize
from anomgen.seeding import sample_generator


class DiffStyleModel(LightningModule):
    trainable = False  # train.py skips Trainer.fit
    generates = True

    def __init__(self, unet: nn.Module, n_style: int = 10, n_content: int = 10, n_held_out: int | None = None,
                 split_seed: int = 0, num_inference_steps: int = 50, t_edit: int = 400, t_boost: int = 200,
                 gamma: float = 0.7, mix: str = "lerp", eta_boost: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["unet"])
        self.generator = DiffStyle(unet, num_inference_steps, t_edit, t_boost, gamma, mix, eta_boost)
        self.generator_name = self.generator.name
        size = getattr(getattr(unet, "config", None), "sample_size", None)
        self.image_size = None if size is None else ((size, size) if isinstance(size, int) else tuple(size))
        self.plan: DiffStylePlan | None = None
        self._inversions: dict[tuple[str, int], Inversion] = {}

    def generation_requests(self, support) -> DiffStylePlan:
        hp = self.hparams
        self.plan = DiffStylePlan(support, hp.n_style, hp.n_content, hp.n_held_out, seed=hp.split_seed)
        self._inversions = {}
        return self.plan

    def _sized(self, image: torch.Tensor) -> torch.Tensor:
        """A [0, 1] image at the UNet's sample size."""
        return image if self.image_size is None else resize(image.unsqueeze(0), self.image_size)[0]

    def _inverted(self, role: str, positions: list[int]) -> list[Inversion]:
        part = self.plan.style if role == "style" else self.plan.content
        todo = sorted({p for p in positions if (role, p) not in self._inversions})
        if todo:
            images = torch.stack([self._sized(part[p]["image"]) for p in todo]).to(self.device)
            for p, inv in zip(todo, self.generator.invert(images, keep_h=role == "content")):
                self._inversions[(role, p)] = inv
        return [self._inversions[(role, p)] for p in positions]

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        if self.plan is None:
            raise RuntimeError("DiffStyleModel: no generation plan; predict through a datamodule whose "
                               "predict_dataloader asks the model for generation_requests(support)")
        indices = batch["index"].tolist()
        pairs = [(i, s, c) for i, s, c in zip(indices, batch["style"].tolist(), batch["content"].tolist()) if s >= 0]
        generated = {}
        if pairs:
            styles = self._inverted("style", [s for _, s, _ in pairs])
            contents = self._inverted("content", [c for _, _, c in pairs])
            gens = [sample_generator(self.hparams.seed, i) for i, _, _ in pairs]
            for (i, _, _), image in zip(pairs, self.generator.generate(styles, contents, gens).cpu()):
                generated[i] = image
        out = {"index": batch["index"], "generator": self.generator_name, "image": [], "mask": None, "label": [],
               "category": [], "defect_type": [], "sources": [], "params": []}
        for i, s, c, j in zip(indices, batch["style"].tolist(), batch["content"].tolist(), batch["held_out"].tolist()):
            if s >= 0:
                fields = self.plan.anomaly_fields(i)
                out["image"].append(generated[i])
                out["label"].append(1)
                out["category"].append(fields["category"])
                out["defect_type"].append(self.generator_name)
                out["sources"].append(fields["sources"])
                out["params"].append({**self.generator.params, "seed": self.hparams.seed, "role": "anomaly"})
            else:
                normal = self.plan.held_out[j]
                out["image"].append(self._sized(normal["image"]))
                out["label"].append(0)
                out["category"].append(normal["category"])
                out["defect_type"].append(GOOD)
                out["sources"].append([normal["image_path"]])
                out["params"].append({"role": "held_out"})
        out["image"] = torch.stack(out["image"])
        out["label"] = torch.tensor(out["label"])
        return out
