"""``model=noise_set`` and ``model=dataset_set``: the baseline validation sets of synthetic validation.

Each exports, like ``model=diffstyle`` on the same task, S·C anomalies (label 1) and the held-out normals (label 0)
of the same :class:`~anomgen.generators.diffstyle.DiffStylePlan` (the same support, ``n_style``, ``n_content``,
``n_held_out`` and ``split_seed``), so that the sets of a task differ only in their anomalies. Nothing to train.
The anomalies are :mod:`anomgen.generators.baselines`: Gaussian noise, or images of another dataset. Every set is
exported at the task's image size and records its split in ``set.json``.

The plan is the one of :mod:`models.split_plan`, as for DiffStyle. The randomness of anomaly ``i`` comes from
``sample_generator(seed, i)`` (noise) or from one permutation seeded by ``seed`` (the other dataset's images), so a
set is the same on 1 or N processes.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from anomgen.data.generation import GeneratedBatch
from anomgen.generators.baselines import NOISE, OTHER_DATASET, GaussianNoise, OtherDatasetImages
from anomgen.generators.diffstyle import N_CONTENT, N_STYLE
from anomgen.seeding import sample_generator
from models.split_plan import SplitPlanned


class HeldOutSetModel(SplitPlanned):
    """The DiffStyle split of the support set, with anomalies made by :meth:`anomaly` (a subclass's)."""

    generator_name = "baseline"

    def __init__(self, n_style: int = N_STYLE, n_content: int = N_CONTENT, n_held_out: int | None = None,
                 split_seed: int = 0, seed: int = 0) -> None:
        super().__init__(n_style, n_content, n_held_out, split_seed)
        self.seed = seed

    def anomaly(self, index: int) -> tuple[torch.Tensor, list[str], dict]:
        """Anomaly ``index`` (< S·C) at the task's size: (3 × H × W image in [0, 1], sources, params)."""
        raise NotImplementedError

    def predict_step(self, batch: dict, batch_idx: int) -> GeneratedBatch:
        if self.plan is None:
            raise RuntimeError(f"{type(self).__name__}: no generation plan; it is built in setup('predict') from the "
                               "datamodule's support set (predict through Trainer.predict with a datamodule)")
        samples = []
        for i in batch["index"].tolist():
            if i < self.plan.n_pairs:
                image, sources, params = self.anomaly(i)
                samples.append({"index": i, "image": image, "label": 1, "defect_type": self.generator_name,
                                "category": self.plan.anomaly_fields(i)["category"], "sources": sources,
                                "params": {**params, "seed": self.seed, "role": "anomaly"}})
            else:
                samples.append(self.plan.held_out_sample(i))
        return GeneratedBatch.from_samples(self.generator_name, samples)


class NoiseSetModel(HeldOutSetModel):
    """Gaussian-noise anomalies (:class:`~anomgen.generators.baselines.GaussianNoise`)."""

    def __init__(self, n_style: int = N_STYLE, n_content: int = N_CONTENT, n_held_out: int | None = None,
                 split_seed: int = 0, seed: int = 0, name: str = NOISE, **noise) -> None:
        """``noise``: :class:`~anomgen.generators.baselines.GaussianNoise`'s fields (mean, std, grey)."""
        super().__init__(n_style, n_content, n_held_out, split_seed, seed)
        self.save_hyperparameters()
        self.generator = GaussianNoise(**noise)
        self.generator_name = name

    def anomaly(self, index: int) -> tuple[torch.Tensor, list[str], dict]:
        return self.generator(self._task_size, sample_generator(self.seed, index)), [], self.generator.params


class DatasetSetModel(HeldOutSetModel):
    """Images of another dataset as anomalies (:class:`~anomgen.generators.baselines.OtherDatasetImages`)."""

    def __init__(self, dataset: Dataset, n_style: int = N_STYLE, n_content: int = N_CONTENT,
                 n_held_out: int | None = None, split_seed: int = 0, seed: int = 0, name: str = OTHER_DATASET) -> None:
        """``dataset``: a parsed dataset (e.g. ``Digits(split="train")``); ``name``: the set's generator name."""
        super().__init__(n_style, n_content, n_held_out, split_seed, seed)
        self.save_hyperparameters(ignore=["dataset"])
        self.generator = OtherDatasetImages(dataset)
        self.generator_name = name
        self._chosen: list[int] = []

    def plan_ready(self) -> None:
        self._chosen = self.generator.choose(self.plan.n_pairs, self.seed)

    def anomaly(self, index: int) -> tuple[torch.Tensor, list[str], dict]:
        image, source = self.generator(self._chosen[index], self._task_size)
        return image, [source], {"dataset": type(self.generator.dataset).__name__}
