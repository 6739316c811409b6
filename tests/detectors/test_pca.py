"""PCA of a feature bank (anomgen.detectors.pca) against scikit-learn."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomgen.detectors.pca import PCAReducer


def test_pca_reducer_equals_sklearn_up_to_sign():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(0)
    bank = rng.normal(size=(60, 10)) * np.linspace(5.0, 0.5, 10) + rng.normal(size=10)
    queries = rng.normal(size=(7, 10))
    reducer = PCAReducer(4).fit(torch.from_numpy(bank))
    reference = PCA(n_components=4).fit(bank)
    ours = reducer.transform(torch.from_numpy(np.concatenate([bank, queries]))).double().numpy()
    theirs = reference.transform(np.concatenate([bank, queries]))
    signs = np.sign((ours * theirs).sum(0))
    np.testing.assert_allclose(ours, theirs * signs, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.abs(reducer.components_.numpy()), np.abs(reference.components_), atol=1e-8)
    assert PCAReducer(20).fit(torch.from_numpy(bank[:5])).n_components_ == 5  # capped at min(N, D)
    with pytest.raises(RuntimeError, match="fit"):
        PCAReducer(2).transform(torch.zeros(3, 10))
    with pytest.raises(ValueError, match="M × 10"):
        reducer.transform(torch.zeros(3, 9))
