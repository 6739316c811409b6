"""``model=diffstyle``: a DiffStyle synthetic validation set from the support set (inference only).

``python train.py model=diffstyle`` skips fitting and runs prediction with the export callback: the set holds the
S × C anomalies (label 1, generated at the UNet's size and resized to the task's) and the held-out normals (label 0,
unchanged), so that it is a validation set on its own; ``set.json`` records the split. The baseline sets of a task
(``models/baseline_sets.py``) hold the same held-out normals. The
algorithm and its hyperparameters are :mod:`anomgen.generators.diffstyle` (keyword arguments other than the split
and the seed go to :class:`~anomgen.generators.diffstyle.DiffStyleConfig`).

The plan (which support images are styles, contents and held-out normals) is a pure function of the support set and
the split hyperparameters, :meth:`DiffStyleModel.predict_requests`. Two parties use it, and neither sets state in
the other:

- the model builds its own plan in :meth:`setup` for ``stage="predict"``, from ``trainer.datamodule.support``
  (Lightning sets the datamodule up before the model), so ``predict_step`` always has the plan it needs;
- the datamodule's ``predict_dataloader`` asks ``model.predict_requests(support)`` for the request dataset (the plan
  itself: request ``i`` names the global index and the positions of its style / content / held-out images). The call
  has no side effect; it returns an equal plan because it is the same pure function of the same support set.

Each style / content image is inverted the first time a batch needs it (so once per process), and every random draw
of sample ``i`` comes from ``sample_generator(seed, i)``, so the set is the same on 1 or N devices and with any
batch size.
"""

from __future__ import annotations

import torch
from torch import nn

from anomgen.data.generation import GeneratedBatch
from anomgen.generators.diffstyle import (
    N_CONTENT,
    N_STYLE,
    DiffStyle,
    Inversion,
)
from anomgen.pixels import resize
from anomgen.seeding import sample_generator
from models.split_plan import SplitPlanned


class DiffStyleModel(SplitPlanned):
    def __init__(self, unet: nn.Module, n_style: int = N_STYLE, n_content: int = N_CONTENT,
                 n_held_out: int | None = None, split_seed: int = 0, seed: int = 0, **diffstyle) -> None:
        super().__init__(n_style, n_content, n_held_out, split_seed)
        self.save_hyperparameters(ignore=["unet"])
        self.generator = DiffStyle(unet, **diffstyle)
        self.generator_name = self.generator.name
        size = getattr(getattr(unet, "config", None), "sample_size", None)
        self.image_size = None if size is None else ((size, size) if isinstance(size, int) else tuple(size))
        self._inversions: dict[tuple[str, int], Inversion] = {}

    def plan_ready(self) -> None:
        self._inversions = {}  # each style / content image of the new plan is inverted once

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

    def predict_step(self, batch: dict, batch_idx: int) -> GeneratedBatch:
        if self.plan is None:
            raise RuntimeError("DiffStyleModel: no generation plan; it is built in setup('predict') from the "
                               "datamodule's support set (predict through Trainer.predict with a datamodule)")
        requests = list(zip(batch["index"].tolist(), batch["style"].tolist(), batch["content"].tolist(),
                            batch["held_out"].tolist()))
        pairs = [(i, s, c) for i, s, c, _ in requests if s >= 0]
        generated = {}
        if pairs:
            styles = self._inverted("style", [s for _, s, _ in pairs])
            contents = self._inverted("content", [c for _, _, c in pairs])
            gens = [sample_generator(self.hparams.seed, i) for i, _, _ in pairs]
            for (i, _, _), image in zip(pairs, self.generator.generate(styles, contents, gens).cpu()):
                generated[i] = image
        samples = []
        for i, s, _, _ in requests:
            if s >= 0:  # generated at the UNet's size, exported at the task's
                image = resize(generated[i].unsqueeze(0), self._task_size)[0]
                samples.append({"index": i, "image": image, "label": 1, "defect_type": self.generator_name,
                                **self.plan.anomaly_fields(i),
                                "params": {**self.generator.params, "seed": self.hparams.seed, "role": "anomaly"}})
            else:
                samples.append(self.plan.held_out_sample(i))
        return GeneratedBatch.from_samples(self.generator_name, samples)
