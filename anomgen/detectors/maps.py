"""What every detector with anomaly maps shares: scores and maps of record batches, one batch at a time."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


class MapDetector:
    """A detector that gives image scores and pixel maps together (WinCLIP, the U-Net localizer).

    A subclass implements :meth:`predict_batch` (one record batch -> (scores B float64, maps B × H × W float32), on
    the CPU, the maps at the images' size) and sets ``name``; :meth:`predict`, :meth:`score` and :meth:`score_maps`
    run it over every batch. ``map_range`` is the range of the maps (the ``score_range`` of binned pixel metrics in
    evaluate.py)."""

    name: str = "detector"
    map_range: tuple[float, float] = (0.0, 1.0)

    def predict_batch(self, batch: dict) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def predict(self, batches: Iterable[dict]) -> tuple[Tensor, Tensor]:
        """(image scores N float64, pixel maps N × H × W float32, CPU) of every record batch in ``batches``."""
        results = [self.predict_batch(batch) for batch in batches]
        if not results:
            raise ValueError(f"{self.name}: no images to score")
        return torch.cat([r[0] for r in results]), torch.cat([r[1] for r in results])

    def score(self, batches: Iterable[dict]) -> Tensor:
        """Image anomaly scores (N, float64, CPU) of every record batch in ``batches``."""
        return self.predict(batches)[0]

    def score_maps(self, batches: Iterable[dict]) -> Tensor:
        """Pixel anomaly maps (N × H × W, float32, CPU) of every record batch in ``batches``, at the images' size."""
        return self.predict(batches)[1]
