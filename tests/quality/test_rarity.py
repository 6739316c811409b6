"""The rarity score, the rarity density and k̂ against brute-force loops in pure Python (small random data)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import beta

from anomgen.quality.rarity import (
    k_hat,
    k_hat_from_minimal,
    knn_radii,
    minimal_k,
    rarity_density,
    rarity_score,
)

# ----------------------------------------------------------------------------- brute force (loops, math.dist)


def bf_sorted_neighbours(normals):
    rows = [list(map(float, x)) for x in normals]
    return [sorted(math.dist(rows[i], rows[j]) for j in range(len(rows)) if j != i) for i in range(len(rows))]


def bf_radii(normals, k):
    return [s[k - 1] for s in bf_sorted_neighbours(normals)]


def bf_rarity(normals, queries, k):
    centres = [list(map(float, x)) for x in normals]
    radii = bf_radii(normals, k)
    out = []
    for q in queries:
        q = list(map(float, q))
        holding = [r for c, r in zip(centres, radii) if r > 0 and math.dist(q, c) <= r]
        out.append(min(holding) if holding else 0.0)
    return out


def bf_own_rarity(normals, k):
    """Rarity of each normal point, memberships decided with the same distances the radii came from."""
    rows = [list(map(float, x)) for x in normals]
    radii = bf_radii(normals, k)
    out = []
    for j in range(len(rows)):
        holding = [radii[i] for i in range(len(rows))
                   if radii[i] > 0 and (i == j or math.dist(rows[i], rows[j]) <= radii[i])]
        out.append(min(holding) if holding else 0.0)
    return out


def bf_density(normals, queries, k):
    own = bf_own_rarity(normals, k)
    total = sum(1.0 / r for r in own if r > 0)
    return [(1.0 / r) / (1.0 / r + total) if r > 0 else 0.0 for r in bf_rarity(normals, queries, k)]


def bf_minimal_k(normals, anomalies, min_k):
    """The reference procedure: grow k from min_k until the anomaly lies in some ball; n - 1 if never."""
    centres = [list(map(float, x)) for x in normals]
    neigh = bf_sorted_neighbours(normals)
    n = len(centres)
    out = []
    for a in anomalies:
        a = list(map(float, a))
        d = [math.dist(a, c) for c in centres]
        found = n - 1
        for k in range(min_k, n):
            if any(neigh[i][k - 1] > 0 and d[i] <= neigh[i][k - 1] for i in range(n)):
                found = k
                break
        out.append(min(found, n - 1))
    return out


def bf_k_hat(normals, anomalies, min_k, q=0.95):
    n = len(normals)
    if n <= min_k + 1:
        return n - 1
    ks = bf_minimal_k(normals, anomalies, min_k)
    p = [(k - min_k) / (n - 1 - min_k) for k in ks]
    kk = int(beta.ppf(q, 1 + sum(p), 1 + len(p) - sum(p)) * (n - 1 - min_k) + min_k)
    return max(min(kk, n - 1), min_k)


@pytest.fixture
def data():
    rng = np.random.default_rng(7)
    normals = rng.normal(size=(60, 3))
    queries = np.vstack([rng.normal(size=(25, 3)) * 1.5,  # mostly inside some ball
                         rng.normal(size=(5, 3)) + 40.0])  # far away: inside no ball
    return normals, queries


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("k", [1, 4, 10, 59])
def test_radii_and_rarity_match_brute_force(data, k):
    normals, queries = data
    np.testing.assert_allclose(knn_radii(normals, k), bf_radii(normals, k), rtol=1e-10)
    got = rarity_score(normals, queries, k)
    want = bf_rarity(normals, queries, k)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=0)
    assert (got[-5:] == 0).all()  # outside all balls
    assert (got[:25] > 0).sum() >= 8  # and the test really covers points inside balls
    np.testing.assert_allclose(rarity_score(normals, None, k), bf_own_rarity(normals, k), rtol=1e-10)


def test_own_rarity_is_at_most_own_radius(data):
    normals, _ = data
    own = rarity_score(normals, None, 5)
    assert (own > 0).all() and (own <= knn_radii(normals, 5) + 1e-12).all()


@pytest.mark.parametrize("k", [3, 12])
def test_density_matches_brute_force(data, k):
    normals, queries = data
    got = rarity_density(normals, queries, k)
    np.testing.assert_allclose(got, bf_density(normals, queries, k), rtol=1e-10, atol=0)
    assert (got[-5:] == 0).all() and (got[:25] > 0).any() and (got < 1).all()


@pytest.mark.parametrize("chunk", [1, 7, 64, 5000])
def test_chunking_does_not_change_results(data, chunk):
    normals, queries = data
    # a different chunking can change the matrix products' rounding (last bits), nothing else
    got, ref = rarity_score(normals, queries, 5, chunk_size=chunk), rarity_score(normals, queries, 5)
    np.testing.assert_array_equal(got == 0, ref == 0)
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    np.testing.assert_allclose(rarity_score(normals, None, 5, chunk_size=chunk), rarity_score(normals, None, 5),
                               rtol=1e-12)
    np.testing.assert_allclose(rarity_density(normals, queries, 5, chunk_size=chunk),
                               rarity_density(normals, queries, 5), rtol=1e-12)
    anomalies = queries[::3]
    np.testing.assert_array_equal(minimal_k(normals, anomalies, 2, chunk_size=chunk), minimal_k(normals, anomalies, 2))


def test_minimal_k_and_k_hat_match_brute_force():
    rng = np.random.default_rng(3)
    normals = rng.normal(size=(90, 2))
    # from the bulk to far away: minimal k's below, around and above the first K (32) of the doubling search,
    # and one anomaly that no ball holds (-> n - 1)
    anomalies = np.array([[0.0, 0.0], [2.2, 0.0], [2.8, 1.0], [3.5, 0.0], [0.0, -4.0], [5.5, 0.0], [60.0, 60.0]])
    got = minimal_k(normals, anomalies, 5)
    want = bf_minimal_k(normals, anomalies, 5)
    np.testing.assert_array_equal(got, want)
    assert got[0] == 5 and got[-1] == 89 and len(set(got.tolist())) >= 4
    assert k_hat(normals, anomalies, 5) == bf_k_hat(normals, anomalies, 5)
    assert k_hat(normals, anomalies[:3], 5) == bf_k_hat(normals, anomalies[:3], 5)
    for candidates in (1, 3, 1000):  # only the starting K of the search depends on it
        np.testing.assert_array_equal(minimal_k(normals, anomalies, 5, candidates=candidates), want)
    for min_k in (1, 10, 40):
        np.testing.assert_array_equal(minimal_k(normals, anomalies, min_k), bf_minimal_k(normals, anomalies, min_k))
        assert k_hat(normals, anomalies, min_k) == bf_k_hat(normals, anomalies, min_k)


def test_k_hat_small_sets_and_formula():
    rng = np.random.default_rng(0)
    normals, anomalies = rng.normal(size=(6, 2)), rng.normal(size=(2, 2)) + 3
    assert k_hat(normals, anomalies, min_k=5) == 5  # n_normal <= min_k + 1 -> n_normal - 1
    assert k_hat(normals[:4], anomalies, min_k=5) == 3
    # every anomaly at min_k: Beta(1, 1 + m); with m = 1 the 95% quantile is 0.7763...
    assert k_hat_from_minimal([5], 105, min_k=5) == int(beta.ppf(0.95, 1, 2) * 99 + 5)
    # every anomaly needing the widest balls: Beta(31, 1), quantile 0.95^(1/31) -> int(0.99835 * 99 + 5) = 103
    assert k_hat_from_minimal([104] * 30, 105, min_k=5) == 103
    for q in (0.05, 0.5, 0.999999):
        assert 5 <= k_hat_from_minimal([104] * 30, 105, min_k=5, quantile=q) <= 104


def test_zero_radius_balls_hold_nothing():
    # three copies of one point: at k = 2 their balls have radius 0; a query on them is inside no ball of radius > 0
    normals = np.array([[0.0, 0.0]] * 3 + [[5.0, 0.0], [6.0, 0.0], [5.0, 1.0]])
    r = rarity_score(normals, np.array([[0.0, 0.0], [5.5, 0.2]]), k=2)
    np.testing.assert_allclose(r, bf_rarity(normals, [[0.0, 0.0], [5.5, 0.2]], 2))
    assert knn_radii(normals, 2)[0] == 0 and r[0] == 0
    assert rarity_density(normals, np.array([[0.0, 0.0]]), 2)[0] == 0


def test_bad_inputs():
    rng = np.random.default_rng(0)
    normals = rng.normal(size=(10, 2))
    with pytest.raises(ValueError, match="k must be"):
        rarity_score(normals, normals, k=10)
    with pytest.raises(ValueError, match="feature dimension mismatch"):
        rarity_score(normals, rng.normal(size=(3, 4)), k=2)
    bad = normals.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        rarity_density(bad, normals, k=2)
    with pytest.raises(ValueError, match="at least 2 normal"):
        knn_radii(normals[:1], 1)
