"""A detector = a feature extractor + a kNN scorer over the features of normal training images."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from anomgen.detectors.knn import KNNScorer
from anomgen.encoders.base import extract_features


class KNNDetector:
    """Fit on normal images, score any images; higher is more anomalous."""

    def __init__(self, extractor: nn.Module, k: int = 2, distance: str = "squared", name: str = "knn",
                 backend: str = "torch") -> None:
        self.extractor = extractor.eval()
        self.scorer = KNNScorer(k=k, distance=distance, backend=backend)
        self.name = name

    def features(self, batches: Iterable[dict], desc: str = "features") -> torch.Tensor:
        return extract_features(self.extractor, batches, desc)

    def fit(self, batches: Iterable[dict]) -> KNNDetector:
        self.scorer.fit(self.features(batches, desc=f"{self.name}: bank"))
        return self

    def score(self, batches: Iterable[dict]) -> torch.Tensor:
        return self.scorer.score(self.features(batches, desc=f"{self.name}: score"))
