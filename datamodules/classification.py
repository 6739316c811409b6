"""Classification over the classes of a shipped dataset, for backbone pretraining (``model=backbone_pretrain``).

The whole dataset is held as tensors (the shipped sets are small). Each epoch is one seeded permutation, cut into
batches; each batch is augmented as it is drawn, from the same seeded generator, so that a run is repeatable. Only
the ``train`` split is used by default: no test image of the pretraining dataset is ever seen. Never pretrain on the
task's out-classes: pretrain on the *other* shipped dataset (or leave classes out with ``exclude_classes``).

Under DDP (the stage run alone with ``trainer.devices=N``; a pipeline runs its cached backbone and DDPM stages on
rank 0 alone) the loader is an ``IterableDataset``, which Lightning's distributed sampler does not split: each rank
takes every N-th image of the epoch's permutation (the same permutation on every rank, padded to a multiple of N as
``DistributedSampler`` pads), so that N ranks share one epoch instead of each training on all of it, and augments
from a generator of its own (``seed + rank``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, IterableDataset

from anomgen.data.shipped import load_images, make_dataset
from anomgen.distributed import rank_generator
from anomgen.errors import ConfigError
from anomgen.pixels import augment_batch


class EpochBatches(IterableDataset):
    """Batches of (augmented images, class indices) in a fresh permutation each time it is iterated (one epoch); with
    ``world_size`` N > 1, rank ``rank``'s share: every N-th image of the (padded) permutation."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, image_size: int,
                 augment: dict | None, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.images, self.labels = images, labels
        self.batch_size, self.image_size = batch_size, image_size
        self.augment = augment
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator().manual_seed(seed)  # the permutations: the same on every rank
        self.augment_generator = self.generator if world_size == 1 else rank_generator(seed, rank)

    def __len__(self) -> int:
        return math.ceil(math.ceil(len(self.images) / self.world_size) / self.batch_size)

    def __iter__(self):
        perm = torch.randperm(len(self.images), generator=self.generator)
        if self.world_size > 1:
            per_rank = math.ceil(len(perm) / self.world_size)
            perm = perm.repeat(math.ceil(per_rank * self.world_size / len(perm)))[: per_rank * self.world_size]
            perm = perm[self.rank :: self.world_size]
        for i in range(0, len(perm), self.batch_size):
            idx = perm[i : i + self.batch_size]
            images = augment_batch(self.images[idx], self.image_size, generator=self.augment_generator,
                                   **self.augment)
            yield {"image": images, "label": self.labels[idx]}


class ClassificationDataModule(LightningDataModule):
    def __init__(self, dataset: str, split: str = "train", exclude_classes: Sequence[str] = (),
                 max_images: int | None = None, batch_size: int = 128, image_size: int = 32,
                 augment: dict | None = None, seed: int = 0) -> None:
        super().__init__()
        self.dataset_name, self.split = dataset, split
        self.exclude_classes = [str(c) for c in exclude_classes]
        self.max_images, self.batch_size, self.image_size = max_images, batch_size, image_size
        self.augment = {"kind": "pad_crop", "padding": 4, "flip": True} if augment is None else dict(augment)
        self.seed = seed
        self.images = self.labels = self.classes = None

    def setup(self, stage: str | None = None) -> None:
        if self.images is None:
            self.images, self.labels, self.classes = load_images(make_dataset(self.dataset_name, self.split),
                                                                 self.exclude_classes, self.max_images, self.seed)
            if len(self.classes) < 2:
                raise ConfigError(f"pretraining needs at least two classes, got {self.classes} (dataset "
                                  f"{self.dataset_name!r}, exclude_classes {self.exclude_classes})")

    def describe(self) -> dict:
        self.setup()
        return {"dataset": self.dataset_name, "split": self.split, "classes": list(self.classes),
                "exclude_classes": self.exclude_classes, "max_images": self.max_images, "seed": self.seed,
                "augment": dict(self.augment), "batch_size": self.batch_size, "num_images": len(self.images)}

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        batches = EpochBatches(self.images, self.labels, self.batch_size, self.image_size, self.augment, self.seed,
                               rank, world)
        return DataLoader(batches, batch_size=None)
