"""Baseline anomalies of synthetic validation: Gaussian noise, and images of another dataset.

Selection compares the DiffStyle validation set of a task (:mod:`anomgen.generators.diffstyle`) with two baselines
that differ from it only in their anomalies: the same held-out normals (the same :class:`DiffStylePlan` split of the
support set) and the same number of anomalies, S·C. The whole of each algorithm:

- :class:`GaussianNoise`: anomaly ``i`` is an image of N(mean, std²) pixels clamped to [0, 1] (grey: one channel
  repeated), drawn from the generator of sample ``i`` (:func:`anomgen.seeding.sample_generator`);
- :class:`OtherDatasetImages`: the anomalies are images of another dataset (digits for Animal-MNIST tasks, CIFAR-10
  here and Tiny-ImageNet in the paper for the real benchmarks), drawn without replacement: anomaly ``i`` is image
  ``order[i]`` of one permutation of that dataset seeded by the set's seed (a pure function of the seed, so every
  process computes the same one), resized to the task's image size.

The Lightning wrappers (``models/baseline_sets.py``) plan the requests and write the held-out normals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset

from anomgen.pixels import resize

NOISE = "noise"
OTHER_DATASET = "other_dataset"


@dataclass(frozen=True)
class GaussianNoise:
    """Gaussian-noise anomalies N(mean, std²), clamped to [0, 1], grey (one channel repeated) or colour."""

    mean: float = 0.5
    std: float = 0.25
    grey: bool = True

    def __post_init__(self) -> None:
        if self.std < 0:
            raise ValueError(f"noise: std must be >= 0, got {self.std}")

    @property
    def params(self) -> dict:
        return {"mean": self.mean, "std": self.std, "grey": self.grey}

    def __call__(self, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        """One 3 × H × W anomaly in [0, 1]; every draw comes from ``generator`` (the sample's own)."""
        noise = torch.randn((1 if self.grey else 3, *size), generator=generator) * self.std + self.mean
        return noise.clamp(0.0, 1.0).expand(3, *size).contiguous()


class OtherDatasetImages:
    """Images of ``dataset`` (a parsed dataset yielding records, e.g. ``Digits(split="train")``) as anomalies."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def choose(self, n: int, seed: int) -> list[int]:
        """The dataset positions of anomalies 0 .. n-1: the first ``n`` of a permutation seeded by ``seed``."""
        if n > len(self.dataset):
            raise ValueError(f"other dataset: asked for {n} anomalies, {type(self.dataset).__name__} has "
                             f"{len(self.dataset)} images")
        return torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(int(seed)))[:n].tolist()

    def __call__(self, position: int, size: tuple[int, int]) -> tuple[torch.Tensor, str]:
        """Image ``position`` of the dataset at ``size`` (3 × H × W in [0, 1]) and its path (the sample's source)."""
        record = self.dataset[position]
        return resize(record["image"].unsqueeze(0), tuple(size))[0], str(record["image_path"])
