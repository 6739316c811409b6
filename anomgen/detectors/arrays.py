"""The one check of feature matrices (samples × features) that detectors and the quality scorers above them take."""

from __future__ import annotations

import numpy as np


def check_features(X, name: str = "X", dim: int | None = None) -> np.ndarray:
    """A finite float64 2-D array, with ``dim`` columns when given; errors say which array and what is wrong."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (samples × features), got shape {X.shape}")
    if len(X) == 0:
        raise ValueError(f"{name} is empty")
    if dim is not None and X.shape[1] != dim:
        raise ValueError(f"{name} has {X.shape[1]} features, the training data had {dim}: feature dimension mismatch")
    bad = ~np.isfinite(X)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise ValueError(f"{name} holds NaN or infinite values (rows {rows[:10].tolist()}"
                         f"{' ...' if len(rows) > 10 else ''})")
    return X
