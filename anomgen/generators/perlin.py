"""DRAEM's Perlin-noise anomalies, the localizer's baseline pairs when no generated set is given: anomalib's
``PerlinAnomalyGenerator`` on a normal image, seeded per sample.

One pair: a Perlin noise map (random scale 2^0..2^5 per axis, rotated by −90..90°) thresholded at 0.5 is the mask;
inside it the image is blended, with β ~ U(0.2, 1), with a texture: three of ten random augmentations (colour
jitter, solarize, posterize, invert, AutoAugment, ...) of either an image of ``anomaly_source_path`` (DRAEM's DTD
textures, when you have them) or, offline and by default, the Perlin noise itself (× 0.5 + 0.25). anomalib draws
every random number from torch's global generator; :meth:`PerlinAnomalies.__call__` runs it inside
``torch.random.fork_rng`` seeded by :func:`anomgen.seeding.sample_seed` of the pair's index, so that pair ``i`` is the
same in every process, worker and run, and the caller's random state is left as it was. The pair is always made
(anomalib's ``probability`` is 1: the localizer's data module mixes normals in itself); when ten draws in a row give
an empty mask anomalib gives up, and the pair is then labelled normal.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from anomgen.data.record import ANOMALOUS, GOOD, NORMAL, make_record
from anomgen.seeding import sample_seed

NAME = "perlin"


class PerlinAnomalies:
    """``(image 3×H×W in [0, 1], index) -> (anomalous image, H×W mask, params)``, seeded by ``(seed, index)``.

    ``blend_factor``, ``rotation_range``, ``dual_mask`` and ``anomaly_source_path`` are anomalib's (DRAEM's
    defaults); anomalib is imported on first use.
    """

    name = NAME

    def __init__(self, seed: int = 0, blend_factor: float | Sequence[float] = (0.2, 1.0),
                 rotation_range: Sequence[float] = (-90.0, 90.0), dual_mask: bool = False,
                 anomaly_source_path: str | os.PathLike | None = None) -> None:
        self.seed = int(seed)
        self.blend_factor = float(blend_factor) if isinstance(blend_factor, (int, float)) else \
            tuple(float(v) for v in blend_factor)
        self.rotation_range = tuple(float(v) for v in rotation_range)
        self.dual_mask = bool(dual_mask)
        self.anomaly_source_path = None if anomaly_source_path is None else str(anomaly_source_path)
        self._generator = None

    @property
    def params(self) -> dict:
        return {"seed": self.seed, "blend_factor": self.blend_factor, "rotation_range": list(self.rotation_range),
                "dual_mask": self.dual_mask, "anomaly_source_path": self.anomaly_source_path}

    def generator(self):
        """anomalib's generator, built once under a fixed seed (its solarize threshold is drawn at construction)."""
        if self._generator is None:
            try:
                from anomalib.data.utils.generators.perlin import PerlinAnomalyGenerator
            except ImportError as err:
                raise ImportError("Perlin pairs use anomalib's PerlinAnomalyGenerator: pip install 'anomgen[perlin]' "
                                  "(anomalib 2.7), or train the localizer on a generated set (pairs=set)") from err

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self._generator = PerlinAnomalyGenerator(
                    anomaly_source_path=self.anomaly_source_path, probability=1.0, blend_factor=self.blend_factor,
                    rotation_range=self.rotation_range, dual_mask=self.dual_mask)
        return self._generator

    def __call__(self, image: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
        generator = self.generator()
        seed = sample_seed(self.seed, index)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out, mask = generator(image.float().cpu())
        return out.clamp(0.0, 1.0), (mask[0] > 0).float(), {"seed": seed, "index": int(index)}


class PerlinPairs(Dataset):
    """Perlin pairs made from ``normals`` (a dataset of normal records): pair ``i`` (any ``i >= 0``) is
    :class:`PerlinAnomalies` of ``normals[i % len(normals)]`` with index ``i``. As a dataset it has ``length`` pairs
    (default ``len(normals)``); :meth:`pair` takes any index (the localizer's training draws a new one each time).

    Records: ``source`` and ``defect_type`` ``"perlin"``, ``image_path`` ``"<normal's path>#perlin-<i>"``,
    ``mask_path`` ``""`` (the mask is in the record, not in a file), label 1 (0 if the mask came out empty).
    """

    def __init__(self, normals: Dataset, anomalies: PerlinAnomalies, length: int | None = None) -> None:
        if len(normals) == 0:
            raise ValueError("Perlin pairs need at least one normal image")
        self.normals = normals
        self.anomalies = anomalies
        self.length = len(normals) if length is None else int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"Perlin pair {index} of {self.length}")
        return self.pair(index)

    def pair(self, index: int) -> dict:
        normal = self.normals[index % len(self.normals)]
        image, mask, _ = self.anomalies(normal["image"], index)
        anomalous = bool(mask.any())
        return make_record(image=image, label=ANOMALOUS if anomalous else NORMAL, mask=mask,
                           image_path=f"{normal['image_path']}#{NAME}-{index}", mask_path="",
                           category=normal["category"], source=NAME, defect_type=NAME if anomalous else GOOD)
