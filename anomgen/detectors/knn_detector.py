"""A detector = a feature extractor + a kNN scorer over the features of normal training images."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from anomgen.detectors.knn import KNNScorer


class KNNDetector:
    """Fit on normal images, score any images; higher is more anomalous."""

    def __init__(self, extractor: nn.Module, k: int = 2, distance: str = "squared", name: str = "knn") -> None:
        self.extractor = extractor.eval()
        self.scorer = KNNScorer(k=k, distance=distance)
        self.name = name

    @torch.no_grad()
    def features(self, batches: Iterable[dict], desc: str = "features") -> torch.Tensor:
        feats = [self.extractor(batch["image"]).float().cpu() for batch in tqdm(batches, desc=desc, leave=False)]
        if not feats:
            raise ValueError(f"{desc}: no images to extract features from")
        return torch.cat(feats)

    def fit(self, batches: Iterable[dict]) -> KNNDetector:
        self.scorer.fit(self.features(batches, desc=f"{self.name}: bank"))
        return self

    def score(self, batches: Iterable[dict]) -> torch.Tensor:
        return self.scorer.score(self.features(batches, desc=f"{self.name}: score"))
