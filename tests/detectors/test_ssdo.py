"""SSDO: prior without labels, label propagation, calibration of predict_proba, reproducibility, input checks."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy.stats import rankdata, spearmanr
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score

import anomgen.detectors
from anomgen.detectors.ssdo import SSDO, _ConstrainedKMeans


@pytest.fixture(scope="module")
def toy():
    """2-D: 400 normals N(0, I) and a tight cluster of 30 anomalies at (2.5, 0), the first 5 of them labelled."""
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(size=(400, 2)), rng.normal(loc=(2.5, 0.0), scale=0.2, size=(30, 2))])
    truth = np.r_[np.zeros(400, int), np.ones(30, int)]
    y = np.zeros(len(X), int)
    y[400:405] = 1
    return X, y, truth


def test_exported():
    assert anomgen.detectors.SSDO is SSDO


def test_no_labels_ranks_like_isolation_forest(toy):
    X, _, _ = toy
    model = SSDO(random_state=3).fit(X)
    scores = model.decision_function(X)
    forest = IsolationForest(n_estimators=100, random_state=3).fit(X)
    reference = -forest.score_samples(X)
    # without labels the score is the min-max scaled forest score: the same ranking
    assert np.array_equal(rankdata(scores), rankdata(reference))
    assert spearmanr(scores, reference).statistic == pytest.approx(1.0)
    np.testing.assert_allclose(scores, (reference - reference.min()) / np.ptp(reference), atol=1e-12)
    np.testing.assert_array_equal(scores, model.score_prior(X))
    # with labels, points far from every label keep their prior
    labelled = SSDO(random_state=3).fit(X, toy[1])
    far = X[:, 0] < -2.0
    np.testing.assert_allclose(labelled.decision_function(X[far]), scores[far], atol=1e-6)


def test_labels_raise_neighbours_and_lower_them_for_normals(toy):
    X, y, _ = toy
    before = SSDO().fit(X).decision_function(X)
    after = SSDO().fit(X, y).decision_function(X)
    unlabelled_anomalies = np.arange(405, 430)  # the labelled ones' neighbours
    assert (after[unlabelled_anomalies] > before[unlabelled_anomalies]).all()
    assert after[y == 1].min() > np.quantile(after[y == 0], 0.95)
    # a labelled normal (y = -1) pulls its neighbourhood down
    y_n = y.copy()
    y_n[0] = -1
    with_normal = SSDO().fit(X, y_n).decision_function(X)
    near0 = np.linalg.norm(X - X[0], axis=1) < 0.3
    assert (with_normal[near0] < after[near0]).all()


def test_auroc_beats_the_prior(toy):
    X, y, truth = toy
    model = SSDO().fit(X, y)
    test = y == 0  # judge on the examples whose label was not given
    auc_ssdo = roc_auc_score(truth[test], model.decision_function(X[test]))
    auc_prior = roc_auc_score(truth[test], model.score_prior(X[test]))
    assert auc_ssdo > auc_prior + 0.03
    assert auc_ssdo > 0.95


def test_cluster_prior_and_constraints(toy):
    X, y, truth = toy
    y2 = y.copy()
    y2[:20] = -1
    km = _ConstrainedKMeans(4, random_state=0).fit(X, y2)
    for c in np.unique(km.labels_):
        assert len(set(y2[km.labels_ == c]) - {0}) <= 1  # no cluster holds both kinds of label
    model = SSDO(prior="cluster", n_clusters=4).fit(X, y2)
    p = model.score_prior(X)
    assert p.min() >= 0.0 and p.max() <= 1.0
    assert roc_auc_score(truth[y2 == 0], model.decision_function(X[y2 == 0])) > 0.95


def test_predict_proba_calibrated(toy):
    X, y, _ = toy
    model = SSDO().fit(X, y)
    proba = model.predict_proba(X)
    assert proba.shape == (len(X), 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert ((proba >= 0) & (proba <= 1)).all()
    assert len(np.unique(model.decision_function(X))) == len(X)  # no ties
    m = int((y == 1).sum())
    assert int((proba[:, 1] > 0.5).sum()) == m
    np.testing.assert_array_equal(model.predict(X), (proba[:, 1] > 0.5).astype(int))
    # P(anomaly) is increasing in the score
    s = model.decision_function(X)
    order = np.argsort(s)
    assert (np.diff(proba[order, 1]) >= 0).all()


def test_predict_proba_without_labels_needs_contamination(toy):
    X, _, _ = toy
    model = SSDO().fit(X)
    with pytest.raises(ValueError, match="contamination"):
        model.predict_proba(X)
    proba = SSDO(contamination=0.05).fit(X).predict_proba(X)
    assert int((proba[:, 1] > 0.5).sum()) == round(0.05 * len(X))


def test_reproducible(toy):
    X, y, _ = toy
    a = SSDO(random_state=7).fit(X, y).decision_function(X)
    b = SSDO(random_state=7).fit(X, y).decision_function(X)
    c = SSDO(random_state=8).fit(X, y).decision_function(X)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    k1 = SSDO(prior="cluster", random_state=1).fit(X, y).decision_function(X)
    k2 = SSDO(prior="cluster", random_state=1).fit(X, y).decision_function(X)
    np.testing.assert_array_equal(k1, k2)


def test_bad_input(toy):
    X, y, _ = toy
    model = SSDO().fit(X, y)
    with pytest.raises(ValueError, match="dimension mismatch"):
        model.decision_function(np.zeros((3, 5)))
    X_nan = X.copy()
    X_nan[3, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        SSDO().fit(X_nan, y)
    with pytest.raises(ValueError, match="NaN"):
        model.predict_proba(X_nan)
    y_bad = y.copy()
    y_bad[0] = 2
    with pytest.raises(ValueError, match="-1"):
        SSDO().fit(X, y_bad)
    with pytest.raises(ValueError, match="labels for"):
        SSDO().fit(X, y[:-1])
    with pytest.raises(ValueError, match="prior"):
        SSDO(prior="lof").fit(X, y)
    with pytest.raises(RuntimeError, match="fit"):
        SSDO().decision_function(X)


def test_fast_on_10k_by_32():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(10_000, 32))
    y = np.zeros(len(X), int)
    y[:50] = 1
    start = time.perf_counter()
    model = SSDO().fit(X, y)
    model.predict_proba(X)
    assert time.perf_counter() - start < 15.0  # about 1 s on one core


def test_label_propagation_matches_the_reference_formula_by_hand():
    """SSDO (Vercruyssen et al. 2018; the authors' anomatools code): s(x) = (p(x) + α Σ_a w_a) / (1 + α (Σ_a w_a +
    Σ_n w_n)), w = 2^{-(d/η)²}, η = the harmonic mean over the training points of the distance to their k-th nearest
    other point. Ten points at 0, 1, ..., 9 on a line, k = 2: the k-distance is 2 at both ends and 1 inside, so
    η = 10 / (2 · 1/2 + 8 · 1/1) = 10/9. The point 9 is a labelled anomaly, 0 a labelled normal; the query is 8.5."""
    X = np.column_stack([np.arange(10.0), np.zeros(10)])
    y = np.zeros(10, dtype=int)
    y[9], y[0] = 1, -1
    model = SSDO(k=2, alpha=2.3).fit(X, y)
    eta = 10 / 9
    assert model.eta_ == pytest.approx(eta, rel=1e-12)

    query = np.array([[8.5, 0.0]])
    p = float(model.score_prior(query)[0])  # the Isolation Forest prior, in [0, 1]; the propagation is what is checked
    w_a = 2.0 ** -((0.5 / eta) ** 2)  # distance 0.5 to the anomaly at 9
    w_n = 2.0 ** -((8.5 / eta) ** 2)  # distance 8.5 to the normal at 0
    expected = (p + 2.3 * w_a) / (1 + 2.3 * (w_a + w_n))
    assert float(model.decision_function(query)[0]) == pytest.approx(expected, rel=1e-9)
    assert expected > p + 0.2  # the anomaly's label pulls its neighbourhood up (w_a ≈ 0.85)
