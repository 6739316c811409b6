"""The squashing scaler: anomaly scores -> P̂(Y = 1 | x) = 1 − 2^{−(f(x)/λ)²}.

``fit(train_scores)`` sets λ so that exactly m training examples get a probability above 0.5 (f > λ): λ lies midway
between the m-th and the (m+1)-th highest training score. m is ``n_anomalies``, or ``round(contamination · n)``
(Python rounding: halves to even) when only a contamination is given.

Shift. The formula needs f >= 0. When the lowest training score is negative, every score is shifted by it
(``offset_`` = that minimum, so the training minimum becomes 0); scores that are already >= 0 are not shifted.
A score below the offset (lower than every training score) is clipped to 0, probability 0. The map is
non-decreasing in the score, strictly increasing above the offset.

Ties. When the m-th and (m+1)-th highest training scores are equal, exactly m is impossible; λ is then put below
the tied group, midway between it and the next lower distinct training score (or 0), so the whole group is above
0.5: the count is the smallest achievable one above m. If the tied value is 0 (after the shift), nothing at 0 can
be above 0.5, so λ goes above the group instead (midway to the next higher distinct score): the largest achievable
count below m. With m = 0, λ is the highest training score (nothing strictly above it). If every training score is
0, λ = 1. ``n_above_`` holds the count actually achieved on the training scores.
"""

from __future__ import annotations

import math

import numpy as np


def _midpoint(hi: float, lo: float) -> float:
    """A value in [lo, hi) strictly below ``hi`` (``lo`` when the two are adjacent floats)."""
    mid = 0.5 * hi + 0.5 * lo
    return mid if lo <= mid < hi else lo


def squash(scores, lam: float, offset: float = 0.0) -> np.ndarray:
    """1 − 2^{−(f/λ)²} with f = max(score − offset, 0)."""
    f = np.maximum(np.asarray(scores, dtype=np.float64) - offset, 0.0)
    return np.clip(-np.expm1(-math.log(2.0) * (f / lam) ** 2), 0.0, 1.0)


class SquashingScaler:
    """Maps anomaly scores (higher = more anomalous) to probabilities of being an anomaly, calibrated on training
    scores so that the m highest-scored training examples are the ones above 0.5."""

    def __init__(self, n_anomalies: int | None = None, contamination: float | None = None):
        self.n_anomalies = n_anomalies
        self.contamination = contamination

    def _target(self, n: int) -> int:
        if self.n_anomalies is not None:
            m = self.n_anomalies
            if int(m) != m or not 0 <= int(m) <= n:
                raise ValueError(f"n_anomalies must be an integer in [0, {n}] (the number of training scores), "
                                 f"got {m}")
            return int(m)
        if self.contamination is not None:
            c = float(self.contamination)
            if not 0.0 <= c < 1.0:
                raise ValueError(f"contamination must be in [0, 1), got {c}")
            return round(c * n)
        raise ValueError("SquashingScaler needs n_anomalies (the number of labelled anomalies among the training "
                         "scores) or contamination (their fraction) to place its 0.5 threshold")

    def fit(self, train_scores) -> SquashingScaler:
        s = np.asarray(train_scores, dtype=np.float64).reshape(-1)
        if len(s) == 0:
            raise ValueError("SquashingScaler.fit got no training scores")
        if not np.isfinite(s).all():
            raise ValueError("SquashingScaler.fit: the training scores hold NaN or infinite values")
        m = self._target(len(s))
        self.offset_ = float(min(s.min(), 0.0))
        f = np.sort(s - self.offset_)[::-1]  # descending, >= 0
        self.lambda_ = self._place(f, m)
        self.n_anomalies_ = m
        self.n_above_ = int((f > self.lambda_).sum())
        return self

    @staticmethod
    def _place(f: np.ndarray, m: int) -> float:
        n = len(f)
        if m == 0:
            return float(f[0]) if f[0] > 0 else 1.0
        hi = float(f[m - 1])
        lo = float(f[m]) if m < n else 0.0
        if hi > lo:
            return _midpoint(hi, lo)
        v = hi  # tie (or m = n with every score 0)
        if v > 0:
            below = f[f < v]
            return _midpoint(v, float(below[0]) if len(below) else 0.0)
        above = f[f > v]
        return _midpoint(float(above[-1]), v) if len(above) else 1.0

    def transform(self, scores) -> np.ndarray:
        """Probabilities in [0, 1], same shape as ``scores``."""
        if not hasattr(self, "lambda_"):
            raise RuntimeError("SquashingScaler.fit(train_scores) must be called before transform")
        return squash(scores, self.lambda_, self.offset_)

    def fit_transform(self, train_scores) -> np.ndarray:
        return self.fit(train_scores).transform(train_scores)
