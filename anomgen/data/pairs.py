"""Image–mask pairs for training a localizer: half real normals with empty masks, half anomalous pairs.

A *pair source* has ``pair(i) -> record`` for any index ``i >= 0`` (and is a dataset of its nominal length):

- :class:`RecordPairs`: a dataset of anomalous records with masks (a synthetic set's pairs), cycled;
- :class:`anomgen.generators.perlin.PerlinPairs`: a new Perlin pair for every index (DRAEM's baseline).

:class:`MixedPairs` is the training set: draw ``g`` is a normal when ``g`` is even and pair ``g // 2`` when it is
odd. Draws are numbered across epochs by :class:`EpochDraws`, the loader's sampler, which yields
``epoch · n + position`` (positions shuffled per epoch by a seeded permutation) and whose epoch Lightning sets
(``set_epoch``, forwarded under DDP): every epoch draws new pairs, and draw ``g`` is the same whatever the number of
workers or devices. :func:`synthetic_pairs` reads a synthetic set's anomalies as pairs and refuses a set whose
anomalies have no masks.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from anomgen.data.base import ImageSize
from anomgen.data.synthetic.format import PathLike
from anomgen.data.synthetic.reader import SyntheticSet
from anomgen.errors import SyntheticSetError
from anomgen.seeding import sample_generator


class RecordPairs(Dataset):
    """A dataset of pair records as a pair source: ``pair(i)`` is ``dataset[i % len(dataset)]``."""

    def __init__(self, dataset: Dataset) -> None:
        if len(dataset) == 0:
            raise ValueError("RecordPairs: no pairs")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[index]

    def pair(self, index: int) -> dict:
        return self.dataset[index % len(self.dataset)]


class MixedPairs(Dataset):
    """Draw ``g`` (any ``g >= 0``): ``normals[(g // 2) % len(normals)]`` for even ``g``, ``pairs.pair(g // 2)`` for
    odd ``g``; half normals (empty masks, label 0), half pairs. ``len`` is the draws of one epoch
    (``samples_per_epoch``); :class:`EpochDraws` numbers the draws of later epochs beyond it."""

    def __init__(self, normals: Dataset, pairs, samples_per_epoch: int) -> None:
        if len(normals) == 0:
            raise ValueError("MixedPairs: no normal images")
        if int(samples_per_epoch) < 2:
            raise ValueError(f"samples_per_epoch must be >= 2 (half normals, half pairs), got {samples_per_epoch}")
        self.normals, self.pairs = normals, pairs
        self.samples_per_epoch = int(samples_per_epoch)

    def __len__(self) -> int:
        return self.samples_per_epoch

    def __getitem__(self, draw: int) -> dict:
        draw = int(draw)
        if draw < 0:
            raise IndexError(f"draw {draw} < 0")
        if draw % 2 == 0:
            return self.normals[(draw // 2) % len(self.normals)]
        return self.pairs.pair(draw // 2)


class EpochDraws(Sampler[int]):
    """The draws of epoch ``e`` (:meth:`set_epoch`): ``e · n + p`` for the positions ``p`` of ``range(n)`` in an order
    drawn from :func:`~anomgen.seeding.sample_generator` ``(seed, e)`` (``shuffle=False``: in order)."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True) -> None:
        self.n, self.seed, self.shuffle = int(n), int(seed), bool(shuffle)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        order = torch.randperm(self.n, generator=sample_generator(self.seed, self.epoch)) if self.shuffle else \
            torch.arange(self.n)
        base = self.epoch * self.n
        return iter((base + order).tolist())


def synthetic_pairs(folder: PathLike, image_size: ImageSize = None) -> SyntheticSet:
    """The anomalies of the synthetic set ``folder`` (resized to ``image_size``) as image–mask pairs; a set with no
    anomaly, or with anomalies that have no mask, is a :class:`~anomgen.errors.SyntheticSetError` naming it."""
    pairs = SyntheticSet(folder, image_size=image_size, labels=(1,))
    if len(pairs) == 0:
        raise SyntheticSetError(f"localizer pairs: the synthetic set {pairs.root} has no anomalous sample; the "
                                "localizer trains on anomaly image-mask pairs")
    missing = [r["id"] for r in pairs.rows if r["mask"] is None]
    if missing:
        raise SyntheticSetError(
            f"localizer pairs: the synthetic set {pairs.root} has {len(missing)} of {len(pairs)} anomalies without a "
            f"mask (e.g. id {missing[0]}); the localizer trains on image-mask pairs: give a set made with masks (e.g. "
            "AnomalyDiffusion's pairs), or train on Perlin pairs (pairs=perlin)")
    return pairs


def holdout_split(n: int, n_holdout: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(kept, held out)``: sorted positions of ``range(n)``, ``n_holdout`` of them held out by a permutation seeded
    by ``seed``."""
    if not 0 <= n_holdout <= n:
        raise ValueError(f"cannot hold out {n_holdout} of {n}")
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(int(i) for i in perm[n_holdout:]), sorted(int(i) for i in perm[:n_holdout])
