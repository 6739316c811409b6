"""EAP: the squashing scaler, the posterior's limits (P1–P3), the ordering realistic > unrealistic >
indistinguishable on constructed data, bootstrap reproducibility, the baselines and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest

from anomgen.detectors import SquashingScaler
from anomgen.quality import (
    EAP,
    DensityQuality,
    PosteriorPlusDensity,
    PosteriorQuality,
    RandomQuality,
    RarityQuality,
    eap_posterior,
    rarity_density,
    rarity_score,
)


class KNNStub:
    """Distance to the k-th nearest normal training point (y == 0): a small deterministic detector."""

    def __init__(self, k: int = 5):
        self.k = k

    def fit(self, X, y):
        self.normals_ = np.asarray(X)[np.asarray(y) == 0]
        return self

    def decision_function(self, X):
        d = np.sqrt(((np.asarray(X)[:, None, :] - self.normals_[None]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, self.k - 1]


def ring(rng, size, low=3.5, high=4.5):
    angle, radius = rng.uniform(0, 2 * np.pi, size), rng.uniform(low, high, size)
    return np.c_[radius * np.cos(angle), radius * np.sin(angle)]


@pytest.fixture(scope="module")
def setting():
    """500 normals ~ N(0, I) in 2-D, 20 labelled anomalies on a ring of radius 3.5–4.5, and 100 auxiliary anomalies
    of each kind: realistic (the same ring), unrealistic (around (60, -60), outside every ball), indistinguishable
    (drawn from the normal distribution)."""
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(size=(500, 2)), ring(rng, 20)])
    y = np.r_[np.zeros(500, int), np.ones(20, int)]
    aux = {"realistic": ring(rng, 100), "unrealistic": rng.normal(size=(100, 2)) + [60.0, -60.0],
           "indistinguishable": rng.normal(size=(100, 2))}
    return X, y, aux


# ----------------------------------------------------------------------------- squashing scaler


@pytest.mark.parametrize("m", [1, 3, 10, 50, 199])
@pytest.mark.parametrize("shift", [0.0, -5.0])
def test_squashing_puts_exactly_m_above_half(m, shift):
    scores = np.random.default_rng(m).gamma(2.0, size=200) + shift  # shift < 0: negative scores are shifted
    scaler = SquashingScaler(n_anomalies=m).fit(scores)
    p = scaler.transform(scores)
    assert (p > 0.5).sum() == m == scaler.n_above_
    assert set(np.flatnonzero(p > 0.5)) == set(np.argsort(scores)[-m:])
    assert ((p >= 0) & (p <= 1)).all()
    grid = np.linspace(scores.min() - 3, scores.max() + 3, 500)
    pg = scaler.transform(grid)
    assert (np.diff(pg) >= 0).all() and np.diff(pg).sum() > 0  # monotone
    assert pg[0] == 0.0  # below every training score: probability 0
    np.testing.assert_allclose(scaler.transform(scaler.lambda_ + scaler.offset_), 0.5)


def test_squashing_formula_offset_and_contamination():
    s = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    scaler = SquashingScaler(contamination=0.4).fit(s)  # round(0.4 * 5) = 2 above
    assert scaler.n_anomalies_ == 2 and scaler.lambda_ == 2.5 and scaler.offset_ == 0.0
    np.testing.assert_allclose(scaler.transform(s), 1 - 2.0 ** (-(s / 2.5) ** 2))
    shifted = SquashingScaler(n_anomalies=2).fit(s - 10)
    assert shifted.offset_ == -10 and shifted.lambda_ == 2.5
    np.testing.assert_allclose(shifted.transform(s - 10), scaler.transform(s))


def test_squashing_ties():
    s = np.array([5.0, 3.0, 3.0, 3.0, 1.0, 0.5, 0.0])
    scaler = SquashingScaler(n_anomalies=2).fit(s)  # 2nd and 3rd highest tie: the tied group goes above
    assert scaler.n_above_ == 4 and (scaler.transform(s) > 0.5).sum() == 4 and scaler.lambda_ == 2.0
    zeros = np.array([2.0, 0.0, 0.0, 0.0])
    assert SquashingScaler(n_anomalies=2).fit(zeros).n_above_ == 1  # a tie at 0 cannot go above
    assert SquashingScaler(n_anomalies=0).fit(s).n_above_ == 0
    assert SquashingScaler(n_anomalies=1).fit(np.zeros(4)).lambda_ == 1.0
    with pytest.raises(ValueError, match="n_anomalies .* or contamination"):
        SquashingScaler().fit(s)
    with pytest.raises(RuntimeError, match="fit"):
        SquashingScaler(n_anomalies=1).transform(s)


# ----------------------------------------------------------------------------- the posterior and its limits


def test_p1_large_n_follows_the_detector():
    ns = 10.0 ** np.arange(1, 9)
    for density, p in [(0.01, 0.3), (1e-4, 0.9), (0.5, 0.0)]:
        gap = np.abs(eap_posterior(density, p, ns, alpha0=0.05, beta0=0.95) - p)
        assert (np.diff(gap) < 0).all() and gap[-1] < 1e-4


def test_p2_zero_density_gives_the_prior():
    p = np.linspace(0, 1, 11)
    for n in (1, 100, 10**6):
        np.testing.assert_allclose(eap_posterior(np.zeros(11), p, n, 0.05, 0.95), 0.05)
        np.testing.assert_allclose(eap_posterior(np.zeros(11), p, n, 2.0, 3.0), 0.4)


def test_p3_certain_anomaly_tends_to_one():
    phi = eap_posterior(1e-3, 1.0, 10.0 ** np.arange(1, 9), 0.05, 0.95)
    assert (np.diff(phi) > 0).all() and 1 - phi[-1] < 1e-4 and (phi < 1).all()


def test_eap_formula_matches_its_pieces(setting):
    X, y, aux = setting
    scorer = EAP(detector=KNNStub()).fit(X, y)
    A = aux["realistic"]
    c = scorer.score_components(A)
    k = scorer.k_hats_[0]
    np.testing.assert_allclose(c["density"], rarity_density(X[y == 0], A, k), rtol=1e-12)
    detector = KNNStub().fit(X, y)
    p = SquashingScaler(n_anomalies=20).fit(detector.decision_function(X)).transform(detector.decision_function(A))
    np.testing.assert_allclose(c["p_anomaly"], p, rtol=1e-12)
    # n = 520, every training example (the paper, the default); n = 500, the normal ones (the reference code)
    np.testing.assert_allclose(scorer.score_samples(A), eap_posterior(c["density"], p, 520, 20 / 520, 500 / 520))
    normal_n = EAP(detector=KNNStub(), n_scale="n_normal").fit(X, y)
    np.testing.assert_allclose(normal_n.score_samples(A), eap_posterior(c["density"], p, 500, 20 / 520, 500 / 520))


# ----------------------------------------------------------------------------- the ordering of the paper's theorem


def _check_ordering(scorer, aux):
    phi = {name: scorer.score_samples(A) for name, A in aux.items()}
    prior = scorer.prior_mean_
    # unrealistic: outside every ball -> exactly the prior mean
    np.testing.assert_allclose(phi["unrealistic"], prior, rtol=1e-12)
    # realistic: every one above the prior
    assert (phi["realistic"] > prior).all()
    # indistinguishable: most below the prior (a few in the tails of N(0, I) are flagged by the detector)
    assert (phi["indistinguishable"] < prior).mean() >= 0.6
    assert np.median(phi["realistic"]) > np.median(phi["unrealistic"]) > np.median(phi["indistinguishable"])
    return phi


def test_theorem_ordering_with_a_stub_detector(setting):
    X, y, aux = setting
    scorer = EAP(detector=KNNStub()).fit(X, y)
    assert scorer.prior_mean_ == pytest.approx(20 / 520)
    phi = _check_ordering(scorer, aux)
    assert phi["realistic"].mean() > phi["unrealistic"].mean() > phi["indistinguishable"].mean()


def test_theorem_ordering_with_ssdo(setting):
    X, y, aux = setting
    _check_ordering(EAP().fit(X, y), aux)  # the default detector: SSDO(k=10), Isolation Forest prior


# ----------------------------------------------------------------------------- bootstrap


def test_bootstrap_is_reproducible(setting):
    X, y, aux = setting
    A = np.vstack(list(aux.values()))
    a = EAP(detector=KNNStub(), num_subsets=4, random_state=3).fit(X, y)
    b = EAP(detector=KNNStub(), num_subsets=4, random_state=3).fit(X, y)
    c = EAP(detector=KNNStub(), num_subsets=4, random_state=4).fit(X, y)
    np.testing.assert_array_equal(a.score_samples(A), b.score_samples(A))
    assert a.k_hats_ == b.k_hats_ and len(a.models_) == 4
    assert not np.allclose(a.score_samples(A), c.score_samples(A))
    sizes = [m.n_normal for m in a.models_]
    assert all(2 <= s < 500 for s in sizes)  # each subset keeps a part of the normals
    _check_ordering(a, aux)


def test_bootstrap_with_ssdo_factory(setting):
    from anomgen.detectors.ssdo import SSDO

    X, y, aux = setting
    scorer = EAP(detector=lambda: SSDO(k=10, n_estimators=50), num_subsets=2, random_state=0).fit(X, y)
    phi = scorer.score_samples(aux["realistic"])
    assert phi.shape == (100,) and (phi > scorer.prior_mean_).mean() > 0.9


# ----------------------------------------------------------------------------- baselines


def test_baselines(setting):
    X, y, aux = setting
    A = aux["realistic"]
    r = RandomQuality(random_state=1).fit(X, y).score_samples(A)
    np.testing.assert_array_equal(r, RandomQuality(random_state=1).fit(X, y).score_samples(A))
    np.testing.assert_allclose(RarityQuality(k=10).fit(X, y).score_samples(A), rarity_score(X[y == 0], A, 10))
    dens = DensityQuality().fit(X, y)
    eap = EAP(detector=KNNStub()).fit(X, y)
    c = eap.score_components(A)
    assert dens.k_hat_ == eap.k_hats_[0]
    np.testing.assert_allclose(dens.score_samples(A), c["density"])
    np.testing.assert_allclose(PosteriorQuality(detector=KNNStub()).fit(X, y).score_samples(A), c["p_anomaly"])
    both = PosteriorPlusDensity(detector=KNNStub()).fit(X, y).score_samples(A)
    np.testing.assert_allclose(both, c["p_anomaly"] + 520 * c["density"])
    normal_scaled = PosteriorPlusDensity(detector=KNNStub(), scale="n_normal").fit(X, y).score_samples(A)
    np.testing.assert_allclose(normal_scaled, c["p_anomaly"] + 500 * c["density"])


# ----------------------------------------------------------------------------- bad inputs


def test_bad_inputs(setting):
    X, y, aux = setting
    with pytest.raises(ValueError, match="at least one labelled anomaly"):
        EAP(detector=KNNStub()).fit(X, np.zeros(len(X), int))
    scorer = EAP(detector=KNNStub()).fit(X, y)
    with pytest.raises(ValueError, match="feature dimension mismatch"):
        scorer.score_samples(np.zeros((3, 5)))
    bad = X.copy()
    bad[4, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        EAP(detector=KNNStub()).fit(bad, y)
    aux_bad = aux["realistic"].copy()
    aux_bad[0, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or infinite"):
        scorer.score_samples(aux_bad)
    with pytest.raises(RuntimeError, match="fit"):
        EAP(detector=KNNStub()).score_samples(aux["realistic"])
    with pytest.raises(ValueError, match="num_subsets"):
        EAP(detector=KNNStub(), num_subsets=-1).fit(X, y)
    with pytest.raises(TypeError, match="decision_function"):
        EAP(detector=object()).fit(X, y)


# ----------------------------------------------------------------------------- φ by hand, the paper's n and the code's


class CoordinateStub:
    """f(x) = the first coordinate."""

    def fit(self, X, y):
        return self

    def decision_function(self, X):
        return np.asarray(X, dtype=np.float64)[:, 0]


def test_phi_by_hand_with_n_of_the_paper_and_of_the_reference_code():
    """Eight normals at 0, 1, ..., 7 on a line and one labelled anomaly at 9 (n = 9 training examples, m = 1,
    n_normal = 8), min_k = 1, f(x) = x. Everything below is written out from the definitions (METHODS.md §5):
    - k̂: the anomaly at 9 first falls in a ball at k = 2 (the ball of 7 has radius 2 there); p* = (2 − 1)/(8 − 1 − 1)
      = 1/6; k̂ = int(Beta(1 + 1/6, 1 + 1 − 1/6).ppf(0.95) · 6 + 1) = 5;
    - P̂(X = x): balls of radius r_5(x_i) (distance to the 5th nearest other normal), rarity = smallest radius of a
      ball that holds the point, P̂ = (1/r(x)) / (1/r(x) + Σ_i 1/r(x_i));
    - P̂(Y = 1 | x) = 1 − 2^{−(f(x)/λ)²}, λ = 8 (midway between the top training score 9 and the next, 7: m = 1 above);
    - φ = (α₀ + n P̂(X) P̂(Y|X)) / (α₀ + β₀ + n P̂(X)), α₀ = m/9, β₀ = 1 − m/9, with n = 9 (the paper: every
      training example; the default) and n = 8 (the reference code's normal count; ``n_scale="n_normal"``)."""
    from scipy.stats import beta

    normals = np.arange(8.0)
    X = np.c_[np.r_[normals, 9.0], np.zeros(9)]
    y = np.r_[np.zeros(8, int), 1]
    query = 7.5

    def radii(k):  # distance from each normal to its k-th nearest other normal
        d = np.abs(normals[:, None] - normals[None])
        return np.array([np.sort(np.delete(row, i))[k - 1] for i, row in enumerate(d)])

    def rarity(x, r):
        holding = r[np.abs(x - normals) <= r]
        return holding.min() if len(holding) else 0.0

    k_anomaly = next(k for k in range(1, 8) if (np.abs(9.0 - normals) <= radii(k)).any())
    assert k_anomaly == 2
    k = int(beta.ppf(0.95, 1 + 1 / 6, 1 + 1 - 1 / 6) * 6 + 1)
    assert k == 5
    r = radii(k)
    density = (1 / rarity(query, r)) / (1 / rarity(query, r) + sum(1 / rarity(x, r) for x in normals))
    p = 1 - 2.0 ** -((query / 8.0) ** 2)
    alpha0, beta0 = 1 / 9, 8 / 9
    phi = {n_scale: (alpha0 + n * density * p) / (alpha0 + beta0 + n * density)
           for n_scale, n in (("n_train", 9), ("n_normal", 8))}
    assert abs(phi["n_train"] - phi["n_normal"]) > 5e-3  # the two readings differ here

    Q = np.array([[query, 0.0]])
    default = EAP(detector=CoordinateStub(), min_k=1).fit(X, y)
    assert default.n_scale == "n_train" and default.k_hats_ == [5]
    c = default.score_components(Q)
    assert c["density"][0] == pytest.approx(density, rel=1e-12)
    assert c["p_anomaly"][0] == pytest.approx(p, rel=1e-12)
    assert default.score_samples(Q)[0] == pytest.approx(phi["n_train"], rel=1e-9)
    reference = EAP(detector=CoordinateStub(), min_k=1, n_scale="n_normal").fit(X, y)
    assert reference.score_samples(Q)[0] == pytest.approx(phi["n_normal"], rel=1e-9)
    with pytest.raises(ValueError, match="n_scale"):
        EAP(detector=CoordinateStub(), n_scale="n_all").fit(X, y)
