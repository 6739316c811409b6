"""Data-valuation baselines: exact checks against brute force, sanity on a toy set, reproducibility, input checks."""

from __future__ import annotations

from itertools import combinations, permutations
from math import factorial

import numpy as np
import pytest
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import KNeighborsClassifier

from anomgen.quality.base import QualityScorer
from anomgen.quality.valuation import DataOOB, KNNShapley, LeaveOneOut


# ----------------------------------------------------------------------------------------------- brute force helpers
def _knn_labels(Xp, yp, members, x, k):
    """Labels of the k nearest of ``members`` to x (ties by pool index)."""
    members = np.asarray(members, dtype=int)
    d = ((Xp[members] - x) ** 2).sum(axis=1)
    return yp[members[np.lexsort((members, d))][:k]]


def _utility(S, Xp, yp, X_val, y_val, k, self_validation):
    """Mean over validation examples of the kNN accuracy (1/k) Σ_{j ≤ min(k, |S|)} 1[y_αj = y] of subset S."""
    total = 0.0
    for j, (x, yv) in enumerate(zip(X_val, y_val)):
        members = [s for s in S if not (self_validation and s == j)]
        if members:
            total += (_knn_labels(Xp, yp, members, x, k) == yv).sum() / k
    return total / len(X_val)


def _shapley_brute(N, U):
    phi = np.zeros(N)
    for i in range(N):
        others = [j for j in range(N) if j != i]
        for r in range(N):
            w = factorial(r) * factorial(N - r - 1) / factorial(N)
            for S in combinations(others, r):
                phi[i] += w * (U(S + (i,)) - U(S))
    return phi


def _shapley_permutations(N, U):
    """Exact over all N! orders (N ≤ 7): an independent second route."""
    phi = np.zeros(N)
    count = 0
    for perm in permutations(range(N)):
        prev, S = U(()), ()
        for p in perm:
            S = S + (p,)
            cur = U(S)
            phi[p] += cur - prev
            prev = cur
        count += 1
    return phi / count


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(4, 2))
    y = np.array([0, 0, 1, 0])
    aux = rng.normal(size=(3, 2)) + np.array([0.5, 0.0])
    X_val = rng.normal(size=(5, 2))
    y_val = np.array([0, 1, 0, 0, 1])
    return X, y, aux, X_val, y_val


@pytest.fixture(scope="module")
def toy():
    """300 normals N(0, I); 4 labelled anomalies on a circle of radius 3; aux: realistic, mislabelled, realistic,
    mislabelled."""
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(size=(300, 2)), [[3.0, 0.0], [0.0, 3.0], [-3.0, 0.0], [0.0, -3.0]]])
    y = np.r_[np.zeros(300, int), np.ones(4, int)]
    aux = np.array([[3.1, 0.1], [0.0, 0.0], [0.1, 3.1], [0.3, -0.2]])
    return X, y, aux


# ----------------------------------------------------------------------------------------------- KNN-Shapley
@pytest.mark.parametrize("k", [1, 2, 3])
def test_knn_shapley_matches_brute_force_with_validation_set(tiny, k):
    X, y, aux, X_val, y_val = tiny
    Xp, yp = np.vstack([X, aux]), np.r_[y, np.ones(len(aux), int)]
    scorer = KNNShapley(k=k).fit(X, y, X_val=X_val, y_val=y_val)
    pool = scorer.pool_values(aux)

    def U(S):
        return _utility(S, Xp, yp, X_val, y_val, k, self_validation=False)

    brute = _shapley_brute(len(Xp), U)
    np.testing.assert_allclose(pool, brute, atol=1e-12)
    np.testing.assert_allclose(scorer.score_samples(aux), brute[len(X):], atol=1e-12)
    assert pool.sum() == pytest.approx(U(tuple(range(len(Xp)))))  # efficiency


@pytest.mark.parametrize("k", [1, 3])
def test_knn_shapley_matches_brute_force_on_the_training_set(tiny, k):
    """Default validation = the training set, each example classified without itself."""
    X, y, aux, _, _ = tiny
    Xp, yp = np.vstack([X, aux]), np.r_[y, np.ones(len(aux), int)]
    pool = KNNShapley(k=k).fit(X, y).pool_values(aux)

    def U(S):
        return _utility(S, Xp, yp, X, y, k, self_validation=True)

    np.testing.assert_allclose(pool, _shapley_brute(len(Xp), U), atol=1e-12)
    np.testing.assert_allclose(pool, _shapley_permutations(len(Xp), U), atol=1e-12)


def test_knn_shapley_batches_do_not_matter(toy):
    X, y, aux = toy
    a = KNNShapley(batch_size=7).fit(X, y).score_samples(aux)
    b = KNNShapley(batch_size=10_000).fit(X, y).score_samples(aux)
    np.testing.assert_allclose(a, b, atol=1e-14)


# ----------------------------------------------------------------------------------------------- leave-one-out
def _loo_brute(X, y, aux, X_val, y_val, k, self_validation, metric):
    Xp, yp = np.vstack([X, aux]), np.r_[y, np.ones(len(aux), int)]

    def perf(members):
        p = np.array([_knn_labels(Xp, yp, [s for s in members if not (self_validation and s == j)], x, k).mean()
                      for j, x in enumerate(X_val)])
        return roc_auc_score(y_val, p) if metric == "auroc" else np.mean((p > 0.5) == y_val)

    everyone = list(range(len(Xp)))
    full = perf(everyone)
    return np.array([full - perf([s for s in everyone if s != len(X) + a]) for a in range(len(aux))])


@pytest.mark.parametrize("metric", ["auroc", "accuracy"])
@pytest.mark.parametrize("self_validation", [True, False])
def test_leave_one_out_matches_brute_force(metric, self_validation):
    rng = np.random.default_rng(2)
    X = np.vstack([rng.normal(size=(40, 2)), rng.normal(loc=2.0, scale=0.5, size=(6, 2))])
    y = np.r_[np.zeros(40, int), np.ones(6, int)]
    aux = rng.normal(loc=1.0, size=(8, 2))
    X_val, y_val = (X, y) if self_validation else (rng.normal(loc=0.5, size=(30, 2)), rng.integers(0, 2, 30))
    for k in (1, 3):
        scorer = LeaveOneOut(k=k, metric=metric)
        scorer.fit(X, y) if self_validation else scorer.fit(X, y, X_val=X_val, y_val=y_val)
        np.testing.assert_allclose(scorer.score_samples(aux),
                                   _loo_brute(X, y, aux, X_val, y_val, k, self_validation, metric), atol=1e-12)


def test_leave_one_out_with_a_given_model_agrees_with_the_fast_knn(toy):
    X, y, aux = toy
    rng = np.random.default_rng(5)
    X_val = np.vstack([rng.normal(size=(50, 2)), [[2.9, 0.2], [0.2, 2.8], [-2.7, 0.1]]])
    y_val = np.r_[np.zeros(50, int), np.ones(3, int)]
    fast = LeaveOneOut(k=5).fit(X, y, X_val=X_val, y_val=y_val).score_samples(aux)
    refit = LeaveOneOut(model=KNeighborsClassifier(5)).fit(X, y, X_val=X_val, y_val=y_val).score_samples(aux)
    np.testing.assert_allclose(fast, refit, atol=1e-12)


# ----------------------------------------------------------------------------------------------- Data-OOB
def test_data_oob_matches_recomputation_from_the_forest(toy):
    X, y, aux = toy
    scorer = DataOOB(n_estimators=50, random_state=3).fit(X, y)
    values = scorer.score_samples(aux)
    forest = scorer.forest_
    n_pool = len(X) + len(aux)
    correct, count = np.zeros(len(aux)), np.zeros(len(aux))
    for tree, samples in zip(forest.estimators_, forest.estimators_samples_):
        oob = np.setdiff1d(np.arange(n_pool), samples)
        oob_aux = oob[oob >= len(X)] - len(X)
        if len(oob_aux) == 0:
            continue
        proba = tree.predict_proba(aux[oob_aux].astype(np.float32))
        correct[oob_aux] += forest.classes_[proba.argmax(axis=1)] == 1
        count[oob_aux] += 1
    assert (count > 0).all()
    np.testing.assert_allclose(values, correct / count, atol=1e-12)
    # the same forest's own out-of-bag estimate (pure leaves: mean OOB probability = share of correct OOB votes)
    Xp, yp = np.vstack([X, aux]), np.r_[y, np.ones(len(aux), int)]
    same = RandomForestClassifier(n_estimators=50, random_state=3, oob_score=True).fit(Xp, yp)
    np.testing.assert_allclose(values, same.oob_decision_function_[len(X):, 1], atol=1e-12)


# ----------------------------------------------------------------------------------------------- all three
SCORERS = [
    pytest.param(lambda: LeaveOneOut(), id="loo"),
    pytest.param(lambda: LeaveOneOut(model=KNeighborsClassifier(5)), id="loo-model"),
    pytest.param(lambda: KNNShapley(), id="knn-shapley"),
    pytest.param(lambda: DataOOB(n_estimators=100), id="data-oob"),
]


@pytest.mark.parametrize("make", SCORERS)
def test_mislabelled_aux_is_worth_less_than_a_realistic_one(toy, make):
    X, y, aux = toy
    scorer = make()
    assert isinstance(scorer, QualityScorer)
    v = scorer.fit(X, y).score_samples(aux)
    assert v.shape == (len(aux),) and np.isfinite(v).all()
    realistic, mislabelled = v[[0, 2]], v[[1, 3]]
    assert realistic.min() >= mislabelled.max()
    assert v[0] > v[1]


@pytest.mark.parametrize("make", SCORERS)
def test_reproducible(toy, make):
    X, y, aux = toy
    np.testing.assert_array_equal(make().fit(X, y).score_samples(aux), make().fit(X, y).score_samples(aux))


def test_data_oob_seed_changes_the_forest(toy):
    X, y, aux = toy
    a = DataOOB(n_estimators=20, random_state=0).fit(X, y).score_samples(aux)
    b = DataOOB(n_estimators=20, random_state=1).fit(X, y).score_samples(aux)
    assert not np.array_equal(a, b)


def test_bad_input(toy):
    X, y, aux = toy
    scorer = KNNShapley().fit(X, y)
    with pytest.raises(ValueError, match="dimension mismatch"):
        scorer.score_samples(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="y must hold"):
        LeaveOneOut().fit(X, np.r_[y[:-1], 2])
    with pytest.raises(ValueError, match="X_val and y_val"):
        LeaveOneOut().fit(X, y, X_val=X)
    with pytest.raises(ValueError, match="both classes"):
        LeaveOneOut().fit(X, y, X_val=X[:5], y_val=np.zeros(5, int))
    with pytest.raises(RuntimeError, match="fit"):
        DataOOB().score_samples(aux)
