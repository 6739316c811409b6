"""EAP, the expected anomaly posterior: a quality score for auxiliary (e.g. synthetic) anomalies.

For an auxiliary anomaly x, EAP combines how plausible x is under the training data, P̂(X = x) (the rarity density
of :mod:`anomgen.quality.rarity`, around the normal training points, with the neighbourhood size k̂ calibrated on the
labelled anomalies), with how anomalous a detector finds it, P̂(Y = 1 | x) (the detector's score through the
:class:`~anomgen.detectors.squashing.SquashingScaler`, calibrated so that m training examples are above 0.5):

    φ(x) = (α₀ + n P̂(X=x) P̂(Y=1|x)) / (α₀ + β₀ + n P̂(X=x))

with n the number of training examples (the paper's n: every example of the training set the model was fitted on,
labelled anomalies included; ``n_scale="n_train"``, the default) and a Beta(α₀, β₀) prior on the anomaly probability
(α₀ = m / n_train, β₀ = 1 − m / n_train by default, n_train counting every training example). The reference code
multiplies by the number of *normal* training points the density was built on instead: ``n_scale="n_normal"``. With
bootstrap subsets, n is counted on each subset (the training set of that subset's model). φ is the
posterior mean of the anomaly probability at x: far from the data (P̂(X=x) = 0) it is the prior mean α₀/(α₀+β₀);
where the data are dense it follows the detector. Realistic anomalies (plausible and flagged by the detector) score
above unrealistic ones (implausible: the prior), which score above indistinguishable ones (plausible but normal-
looking, P̂(Y=1|x) below the prior mean).

With ``num_subsets = N > 0`` φ is averaged over N bootstrap subsets of the training set: each keeps every training
example with probability p ~ U(min_size, 0.99), min_size = (min_k + 1 + m) / n_train; the detector is refitted on the
subset, k̂ is computed from the subset's normal points against *all* labelled anomalies, and the density is built on
the subset's normal points. A subset without a labelled anomaly or with fewer than 2 normal points is drawn again.
``num_subsets = 0`` uses the whole training set once.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np

from anomgen.detectors.arrays import check_features
from anomgen.detectors.squashing import SquashingScaler
from anomgen.quality.base import QualityScorer
from anomgen.quality.rarity import DEFAULT_CHUNK, RarityDensity, k_hat


def eap_posterior(density, p_anomaly, n, alpha0: float, beta0: float) -> np.ndarray:
    """φ = (α₀ + n·P̂(X=x)·P̂(Y=1|x)) / (α₀ + β₀ + n·P̂(X=x)), elementwise."""
    if alpha0 <= 0 or beta0 <= 0:
        raise ValueError(f"the Beta prior needs alpha0 > 0 and beta0 > 0, got alpha0={alpha0}, beta0={beta0}")
    w = np.asarray(n, dtype=np.float64) * np.asarray(density, dtype=np.float64)
    return (alpha0 + w * np.asarray(p_anomaly, dtype=np.float64)) / (alpha0 + beta0 + w)


def default_detector():
    """SSDO with k = 10 and an Isolation Forest prior (the detector of the paper)."""
    from anomgen.detectors.ssdo import SSDO

    return SSDO(k=10)


def fresh_detector(detector):
    """An unfitted detector from ``detector``: None -> SSDO(k=10); a class or factory -> called; an instance ->
    cloned (``sklearn.base.clone`` when it has ``get_params``, else a deep copy)."""
    if detector is None:
        return default_detector()
    if isinstance(detector, type) or (callable(detector) and not hasattr(detector, "fit")):
        detector = detector()
    elif hasattr(detector, "get_params"):
        from sklearn.base import clone

        detector = clone(detector)
    else:
        detector = copy.deepcopy(detector)
    if not (hasattr(detector, "fit") and hasattr(detector, "decision_function")):
        raise TypeError(f"the detector must have fit(X, y) and decision_function(X), got {type(detector).__name__}")
    return detector


class DetectorPosterior:
    """P̂(Y = 1 | x): a detector fitted on (X, y), its decision_function squashed with m = number of y == 1."""

    def __init__(self, detector=None):
        self.detector = detector

    def fit(self, X: np.ndarray, y: np.ndarray) -> DetectorPosterior:
        self.detector_ = fresh_detector(self.detector)
        self.detector_.fit(X, y)
        train_scores = np.asarray(self.detector_.decision_function(X), dtype=np.float64).reshape(-1)
        self.scaler_ = SquashingScaler(n_anomalies=int((y == 1).sum())).fit(train_scores)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        scores = np.asarray(self.detector_.decision_function(X), dtype=np.float64).reshape(-1)
        return self.scaler_.transform(scores)


#: what n counts in φ: every training example (the paper) or the normal ones the density is built on (the reference
#: code)
N_SCALES = ("n_train", "n_normal")


@dataclass
class _SubsetModel:
    k: int
    density: RarityDensity
    posterior: DetectorPosterior
    n_train: int  # training examples of the (sub)set, labelled anomalies included

    @property
    def n_normal(self) -> int:
        return self.density.n_normal

    def n(self, n_scale: str) -> int:
        """The n of φ: ``n_train`` or ``n_normal`` (see :data:`N_SCALES`)."""
        return self.n_train if n_scale == "n_train" else self.n_normal


def fit_density(X: np.ndarray, y: np.ndarray, X_anomalies: np.ndarray, min_k: int = 5, quantile: float = 0.95,
                chunk_size: int = DEFAULT_CHUNK) -> RarityDensity:
    """The rarity density on the normal points of (X, y), at the k̂ calibrated on ``X_anomalies``."""
    normals = X[y == 0]
    k = k_hat(normals, X_anomalies, min_k, quantile, chunk_size)
    return RarityDensity(k, chunk_size).fit(normals)


def draw_subsets(y: np.ndarray, num_subsets: int, min_k: int, rng: np.random.Generator,
                 max_tries: int = 1000) -> list[np.ndarray]:
    """Index arrays of ``num_subsets`` bootstrap subsets (0 -> the whole set once); see the module docstring."""
    n = len(y)
    if num_subsets == 0:
        return [np.arange(n)]
    m = int((y == 1).sum())
    low = min((min_k + 1 + m) / n, 0.99)
    subsets = []
    for p in rng.uniform(low, 0.99, size=num_subsets):
        for _ in range(max_tries):
            idx = np.flatnonzero(rng.random(n) < p)
            if (y[idx] == 1).any() and (y[idx] == 0).sum() >= 2:
                subsets.append(idx)
                break
        else:
            raise ValueError(f"could not draw a bootstrap subset with a labelled anomaly and 2 normal points in "
                             f"{max_tries} tries (keep probability {p:.3f}); use num_subsets=0 or more data")
    return subsets


class EAP(QualityScorer):
    """Expected anomaly posterior of auxiliary anomalies (higher = better anomaly to train on).

    Parameters: ``detector`` (None -> SSDO(k=10); an object with fit(X, y) / decision_function(X), cloned per fit,
    or a factory), ``min_k`` (smallest neighbourhood for the rarity density), ``alpha0`` / ``beta0`` (Beta prior;
    None -> m / n_train and 1 − m / n_train), ``num_subsets`` (0 = whole training set once, N = average over N
    bootstrap subsets), ``random_state`` (seeds the subsets), ``quantile`` (of the k̂ posterior),
    ``chunk_size`` (rows of distances computed at once), ``n_scale`` (the n of φ: ``"n_train"``, every training
    example, as in the paper, or ``"n_normal"``, the normal training points, as in the reference code).
    """

    name = "eap"
    needs_anomalies = True

    def __init__(self, detector=None, min_k: int = 5, alpha0: float | None = None, beta0: float | None = None,
                 num_subsets: int = 0, random_state: int | None = 0, quantile: float = 0.95,
                 chunk_size: int = DEFAULT_CHUNK, n_scale: str = "n_train"):
        self.detector = detector
        self.min_k = min_k
        self.alpha0 = alpha0
        self.beta0 = beta0
        self.num_subsets = num_subsets
        self.random_state = random_state
        self.quantile = quantile
        self.chunk_size = chunk_size
        self.n_scale = n_scale

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        if int(self.num_subsets) != self.num_subsets or self.num_subsets < 0:
            raise ValueError(f"num_subsets must be an integer >= 0 (0 = no bootstrap), got {self.num_subsets}")
        if int(self.min_k) != self.min_k or self.min_k < 1:
            raise ValueError(f"min_k must be an integer >= 1, got {self.min_k}")
        if self.n_scale not in N_SCALES:
            raise ValueError(f"n_scale must be one of {N_SCALES}, got {self.n_scale!r}")
        n, m = len(y), int((y == 1).sum())
        self.alpha0_ = m / n if self.alpha0 is None else float(self.alpha0)
        self.beta0_ = 1.0 - m / n if self.beta0 is None else float(self.beta0)
        if self.alpha0_ <= 0 or self.beta0_ <= 0:
            raise ValueError(f"the Beta prior needs alpha0 > 0 and beta0 > 0, got {self.alpha0_}, {self.beta0_}")
        X_anomalies = X[y == 1]
        rng = np.random.default_rng(self.random_state)
        self.models_: list[_SubsetModel] = []
        for idx in draw_subsets(y, int(self.num_subsets), int(self.min_k), rng):
            Xs, ys = X[idx], y[idx]
            density = fit_density(Xs, ys, X_anomalies, int(self.min_k), self.quantile, self.chunk_size)
            posterior = DetectorPosterior(self.detector).fit(Xs, ys)
            self.models_.append(_SubsetModel(density.k_, density, posterior, len(idx)))
        self.k_hats_ = [model.k for model in self.models_]

    def _components(self, X_aux: np.ndarray) -> dict[str, np.ndarray]:
        out = {"density": 0.0, "p_anomaly": 0.0, "eap": 0.0}
        for model in self.models_:
            density = model.density.density(X_aux)
            p = model.posterior.predict(X_aux)
            out["density"] = out["density"] + density
            out["p_anomaly"] = out["p_anomaly"] + p
            phi = eap_posterior(density, p, model.n(self.n_scale), self.alpha0_, self.beta0_)
            out["eap"] = out["eap"] + phi
        return {key: value / len(self.models_) for key, value in out.items()}

    def _score(self, X_aux: np.ndarray) -> np.ndarray:
        return self._components(X_aux)["eap"]

    def score_components(self, X_aux) -> dict[str, np.ndarray]:
        """``density`` P̂(X=x), ``p_anomaly`` P̂(Y=1|x) and ``eap`` φ(x), each averaged over the subsets."""
        if not hasattr(self, "n_features_in_"):
            raise RuntimeError("EAP.fit(X, y) must be called before score_components")
        return self._components(check_features(X_aux, "X_aux", self.n_features_in_))

    @property
    def prior_mean_(self) -> float:
        """α₀ / (α₀ + β₀): the score of an auxiliary anomaly outside every ball."""
        return self.alpha0_ / (self.alpha0_ + self.beta0_)
