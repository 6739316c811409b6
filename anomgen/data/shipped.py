"""The multi-class sets that ship with packages (sklearn digits, Animal-MNIST), by name and as tensors: what
backbone pretraining and the small DDPM train on."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from anomgen.data.animal_mnist import AnimalMNIST
from anomgen.data.digits import Digits

DATASETS = ("digits", "animal_mnist")


def make_dataset(name: str, split: str = "train") -> Dataset:
    """One of the shipped multi-class sets (:data:`DATASETS`) by name."""
    if name == "digits":
        return Digits(split=split)
    if name == "animal_mnist":
        return AnimalMNIST(split=split)
    raise ValueError(f"unknown pretraining dataset {name!r}; known: {', '.join(DATASETS)}")


def load_images(
    dataset: Dataset,
    exclude_classes: Sequence[str] = (),
    max_images: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All images of ``dataset`` (N × 3 × H × W in [0, 1]), their class indices and the class names.

    Records whose ``category`` is in ``exclude_classes`` are left out (an excluded name the dataset does not have is
    an error, so that a typo cannot silently leave an out-class in). ``max_images`` keeps a seeded random subset.
    """
    exclude = {str(c) for c in exclude_classes}
    known = getattr(dataset, "available_categories", None)
    if known is not None and exclude - set(known):
        raise ValueError(f"--exclude-classes: {sorted(exclude - set(known))} are not classes of "
                         f"{getattr(dataset, 'name', type(dataset).__name__)} (its classes: {', '.join(known)})")
    images, categories = [], []
    for i in range(len(dataset)):
        record = dataset[i]
        if record["category"] in exclude:
            continue
        images.append(record["image"])
        categories.append(record["category"])
    if not images:
        raise ValueError("no images left to pretrain on (every class excluded?)")
    order = list(known) if known is not None else sorted(set(categories))
    classes = [c for c in order if c in set(categories)]
    index = {c: i for i, c in enumerate(classes)}
    x = torch.stack(images)
    y = torch.tensor([index[c] for c in categories], dtype=torch.long)
    if max_images is not None and max_images < len(x):
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:max_images]
        x, y = x[keep], y[keep]
    return x, y, classes


__all__ = ["DATASETS", "load_images", "make_dataset"]
