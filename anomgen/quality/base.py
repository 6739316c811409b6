"""The interface every quality scorer of auxiliary anomalies shares (scikit-learn style).

``fit(X, y)`` takes the training set: features ``X`` (n × d) and ``y`` with 1 for the m labelled anomalies and 0 for
the rest (normal or unlabelled). ``score_samples(X_aux)`` returns one quality score per auxiliary anomaly: higher
means a more useful anomaly to train on.
"""

from __future__ import annotations

import numpy as np

from anomgen.detectors.arrays import check_features


def check_training_labels(y, n: int, needs_anomalies: bool = True, who: str = "quality scorer") -> np.ndarray:
    """Labels 0/1 of length n; with ``needs_anomalies``, at least one labelled anomaly."""
    y = np.asarray(y).reshape(-1)
    if len(y) != n:
        raise ValueError(f"y has {len(y)} labels for {n} training examples")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"y must hold 0 (normal / unlabelled) and 1 (labelled anomaly), got values {np.unique(y)}")
    if needs_anomalies and not (y == 1).any():
        raise ValueError(f"{who} needs at least one labelled anomaly in the training set (y == 1): it calibrates "
                         "the detector's posterior and the rarity neighbourhood on them; got none")
    if not (y == 0).any():
        raise ValueError(f"{who} needs normal training examples (y == 0); got only anomalies")
    return y.astype(np.int64)


class QualityScorer:
    """Base class: subclasses implement ``_fit`` and ``_score``; inputs are checked here, once."""

    name = "quality"
    needs_anomalies = True

    def fit(self, X, y) -> QualityScorer:
        X = check_features(X, "X")
        y = check_training_labels(y, len(X), self.needs_anomalies, type(self).__name__)
        self.n_features_in_ = X.shape[1]
        self._fit(X, y)
        return self

    def score_samples(self, X_aux) -> np.ndarray:
        if not hasattr(self, "n_features_in_"):
            raise RuntimeError(f"{type(self).__name__}.fit(X, y) must be called before score_samples")
        X_aux = check_features(X_aux, "X_aux", self.n_features_in_)
        return np.asarray(self._score(X_aux), dtype=np.float64)

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        raise NotImplementedError

    def _score(self, X_aux: np.ndarray) -> np.ndarray:
        raise NotImplementedError
