"""Baseline quality scores of auxiliary anomalies, in the :class:`~anomgen.quality.base.QualityScorer` interface.

Every score is "higher = better" as the evaluation ranks it:

- ``RandomQuality``: uniform random numbers (seeded), the chance level.
- ``RarityQuality``: the rarity score itself, r_k(x) with a fixed k (10), the balls built on the normal training
  points; as in the paper the score is the rarity (higher = rarer); 0 for points outside every ball.
- ``DensityQuality``: the rarity density P̂(X = x) at the calibrated k̂ (the density half of EAP).
- ``PosteriorQuality``: P̂(Y = 1 | x), the detector's score through the squashing scaler (the other half).
- ``PosteriorPlusDensity``: P̂(Y = 1 | x) + N · P̂(X = x), the naive sum of both halves. N is the number of training
  examples (all of them, labelled anomalies included), as in the reference code; ``scale="n_normal"`` uses the
  number of normal training points instead.
"""

from __future__ import annotations

import numpy as np

from anomgen.quality.base import QualityScorer
from anomgen.quality.eap import DetectorPosterior, fit_density
from anomgen.quality.rarity import DEFAULT_CHUNK, RarityDensity


class RandomQuality(QualityScorer):
    """Uniform random scores in [0, 1); the same ``random_state`` gives the same scores for the same input size."""

    name = "random"
    needs_anomalies = False

    def __init__(self, random_state: int | None = 0):
        self.random_state = random_state

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        pass

    def _score(self, X_aux: np.ndarray) -> np.ndarray:
        return np.random.default_rng(self.random_state).random(len(X_aux))


class RarityQuality(QualityScorer):
    """The rarity score r_k(x) (k-NN balls around the normal training points; 0 outside all balls)."""

    name = "rarity"
    needs_anomalies = False

    def __init__(self, k: int = 10, chunk_size: int = DEFAULT_CHUNK):
        self.k = k
        self.chunk_size = chunk_size

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        self.density_ = RarityDensity(self.k, self.chunk_size).fit(X[y == 0])

    def _score(self, X_aux: np.ndarray) -> np.ndarray:
        return self.density_.rarity(X_aux)


class DensityQuality(QualityScorer):
    """P̂(X = x): the rarity density at k̂ (calibrated on the labelled anomalies, from ``min_k``)."""

    name = "density"
    needs_anomalies = True

    def __init__(self, min_k: int = 5, quantile: float = 0.95, chunk_size: int = DEFAULT_CHUNK):
        self.min_k = min_k
        self.quantile = quantile
        self.chunk_size = chunk_size

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        self.density_ = fit_density(X, y, X[y == 1], self.min_k, self.quantile, self.chunk_size)
        self.k_hat_ = self.density_.k_

    def _score(self, X_aux: np.ndarray) -> np.ndarray:
        return self.density_.density(X_aux)


class PosteriorQuality(QualityScorer):
    """P̂(Y = 1 | x): the detector (default SSDO(k=10)) fitted on the training set, squashed to a probability."""

    name = "posterior"
    needs_anomalies = True

    def __init__(self, detector=None):
        self.detector = detector

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        self.posterior_ = DetectorPosterior(self.detector).fit(X, y)

    def _score(self, X_aux: np.ndarray) -> np.ndarray:
        return self.posterior_.predict(X_aux)


class PosteriorPlusDensity(QualityScorer):
    """P̂(Y = 1 | x) + N · P̂(X = x); N = number of training examples (``scale="n_train"``) or of normal ones."""

    name = "posterior_plus_density"
    needs_anomalies = True

    def __init__(self, detector=None, min_k: int = 5, scale: str = "n_train", quantile: float = 0.95,
                 chunk_size: int = DEFAULT_CHUNK):
        self.detector = detector
        self.min_k = min_k
        self.scale = scale
        self.quantile = quantile
        self.chunk_size = chunk_size

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        if self.scale not in ("n_train", "n_normal"):
            raise ValueError(f"scale must be 'n_train' or 'n_normal', got {self.scale!r}")
        self.posterior_ = DetectorPosterior(self.detector).fit(X, y)
        self.density_ = fit_density(X, y, X[y == 1], self.min_k, self.quantile, self.chunk_size)
        self.n_scale_ = len(X) if self.scale == "n_train" else int((y == 0).sum())

    def _score(self, X_aux: np.ndarray) -> np.ndarray:
        return self.posterior_.predict(X_aux) + self.n_scale_ * self.density_.density(X_aux)
