"""SSDO: semi-supervised detection of anomalies (Vercruyssen et al., ICDM 2018), the detector that EAP calibrates.

SSDO scores an example in two steps.

1. **Unsupervised prior** ``p(x)`` in [0, 1]. ``prior="iforest"`` (the EAP setting): the anomaly score of a
   scikit-learn :class:`~sklearn.ensemble.IsolationForest` (``-score_samples``), min-max scaled with the smallest
   and largest score of the training set and clipped to [0, 1]. ``prior="cluster"`` (the SSDO paper's own prior):
   constrained k-means (cannot-link constraints between every labelled anomaly and every labelled normal, as in
   COP-k-means, so that no cluster mixes the two; see ``_ConstrainedKMeans`` for how they are kept), and per example
   ``(distance to its centroid / largest distance in its cluster) × (cluster isolation) / (relative cluster size)``,
   where the isolation is the distance from the centroid to the nearest other centroid divided by the largest such
   distance, and the relative size is the cluster's size divided by the largest cluster's size; the same min-max
   scaling to [0, 1] follows.
2. **Label propagation.** Every labelled example ``x_l`` spreads its label to its neighbourhood with the weight
   ``w(x, x_l) = 2^{-(d(x, x_l)/η)²}`` (1 at ``x_l``, 1/2 at distance η), where η is the harmonic mean, over the
   training examples, of the distance to their k-th nearest neighbour — ``k`` sets the size of the neighbourhood a
   label reaches. The score is the weighted mean of the prior (weight 1) and the labels (weight α·w; anomaly 1,
   normal 0)::

       s(x) = (p(x) + α Σ_{l ∈ anomalies} w(x, x_l)) / (1 + α Σ_{l ∈ labelled} w(x, x_l))

   Labelled anomalies pull their neighbourhood up towards 1, labelled normals pull theirs down towards 0; far from
   every label the score is the prior. With no labels the score *is* the prior, so SSDO ranks exactly like its
   Isolation Forest (up to ties created by the clipping of scores outside the training range).

Labels: ``y = 1`` labelled anomaly, ``y = -1`` labelled normal, ``y = 0`` unlabelled. The project's quality
scorers use ``y = 0`` for "normal or unlabelled": passed to SSDO unchanged, those examples are treated as
unlabelled (they shape the prior, they do not propagate a label).

``predict_proba`` maps the scores to P(anomaly) with the project's :class:`~anomgen.detectors.squashing.SquashingScaler`
fitted on the training scores so that exactly m training examples (m = number of labelled anomalies, or
``contamination × n`` when there are none) lie above 0.5.
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans, kmeans_plusplus
from sklearn.ensemble import IsolationForest
from sklearn.metrics.pairwise import euclidean_distances
from sklearn.neighbors import NearestNeighbors

from anomgen.detectors.arrays import check_features
from anomgen.detectors.squashing import SquashingScaler

__all__ = ["SSDO"]

_TOL = 1e-12
_PRIORS = ("iforest", "cluster")


def _check_labels(y, n: int) -> np.ndarray:
    if y is None:
        return np.zeros(n, dtype=np.int64)
    y = np.asarray(y).reshape(-1)
    if len(y) != n:
        raise ValueError(f"y has {len(y)} labels for {n} training examples")
    try:
        ok = np.isin(y, (-1, 0, 1)).all()
    except TypeError:  # e.g. strings or objects that cannot be compared with numbers
        ok = False
    if not ok:
        raise ValueError("SSDO labels must be 1 (labelled anomaly), 0 (unlabelled) or -1 (labelled normal); got "
                         f"values {np.unique(y.astype(str)) if y.dtype.kind not in 'biuf' else np.unique(y)}")
    return y.astype(np.int64)


def _sq_dists(A: np.ndarray, B: np.ndarray) -> np.ndarray:
    return euclidean_distances(A, B, squared=True)


class _ConstrainedKMeans:
    """k-means in which no cluster holds both a labelled anomaly and a labelled normal (COP-k-means).

    Unlabelled examples take their nearest centroid. Each cluster is given the kind (anomaly / normal / none) of the
    majority of the labelled examples nearest to it, and every labelled example joins the nearest cluster of its own
    kind or of no kind; when the other kind holds every cluster, one new cluster is opened for the homeless examples.
    Without constraints (labels of one kind only) this is plain scikit-learn k-means.
    """

    def __init__(self, n_clusters: int, random_state: int | None, n_init: int = 3, max_iter: int = 100) -> None:
        self.n_clusters = n_clusters
        self.random_state = random_state
        self.n_init = n_init
        self.max_iter = max_iter

    def fit(self, X: np.ndarray, y: np.ndarray) -> _ConstrainedKMeans:
        n_clusters = max(1, min(self.n_clusters, len(X)))
        constrained = (y == 1).any() and (y == -1).any()
        if not constrained:
            km = KMeans(n_clusters=n_clusters, n_init=self.n_init, max_iter=self.max_iter,
                        random_state=self.random_state).fit(X)
            self.cluster_centers_, self.labels_ = km.cluster_centers_, km.labels_
            return self
        rng = np.random.default_rng(self.random_state)
        best = None
        for _ in range(self.n_init):
            seed = int(rng.integers(2**31 - 1))
            centers, _ = kmeans_plusplus(X, n_clusters, random_state=seed)
            centers, labels = self._lloyd(X, y, centers)
            inertia = float(((X - centers[labels]) ** 2).sum())
            if best is None or inertia < best[0]:
                best = (inertia, centers, labels)
        _, self.cluster_centers_, self.labels_ = best
        return self

    def _lloyd(self, X: np.ndarray, y: np.ndarray, centers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        labelled = np.flatnonzero(y != 0)
        scale = max(float(np.var(X, axis=0).sum()), _TOL)
        labels = np.zeros(len(X), dtype=np.int64)
        for _ in range(self.max_iter):
            D = _sq_dists(X, centers)
            labels = D.argmin(axis=1)
            # each cluster takes the kind of the majority of the labelled examples nearest to it (ties: the kind of
            # the closest one); a labelled example then joins the nearest cluster of its own kind or of no kind
            c_near = labels[labelled]
            votes = np.zeros(len(centers))
            np.add.at(votes, c_near, y[labelled])
            kind = np.sign(votes).astype(np.int64)
            for c in np.unique(c_near[votes[c_near] == 0]):
                members = labelled[c_near == c]
                kind[c] = y[members[D[members, c].argmin()]]
            for label in (1, -1):
                own = labelled[y[labelled] == label]
                if len(own) == 0:
                    continue
                allowed = (kind == 0) | (kind == label)
                if allowed.any():
                    cols = np.flatnonzero(allowed)
                    labels[own] = cols[D[np.ix_(own, cols)].argmin(axis=1)]
                else:  # every cluster is held by the other kind: open one for these examples
                    centers = np.vstack([centers, X[own].mean(axis=0)])
                    D = np.column_stack([D, ((X - centers[-1]) ** 2).sum(axis=1)])
                    kind = np.append(kind, label)
                    labels[own] = len(centers) - 1
                kind[np.unique(labels[own])] = label  # clusters that took these examples are closed to the others
            # recompute the centroids, drop empty clusters and renumber
            used, labels = np.unique(labels, return_inverse=True)
            counts = np.bincount(labels, minlength=len(used)).astype(np.float64)
            updated = np.zeros((len(used), X.shape[1]))
            np.add.at(updated, labels, X)
            updated /= counts[:, None]
            shift = np.inf if len(used) != len(centers) else float(((updated - centers) ** 2).sum())
            centers = updated
            if shift <= 1e-10 * scale:
                break
        return centers, labels


class SSDO:
    """Semi-supervised anomaly detector: an unsupervised prior corrected by label propagation (see module doc).

    Parameters
    ----------
    k : neighbourhood size of the label propagation: η is the harmonic mean of the training examples' distances to
        their k-th nearest neighbour (10, as in the EAP paper).
    alpha : weight of the labels against the prior (2.3, the SSDO default); larger = labels count more.
    prior : ``"iforest"`` (Isolation Forest, the EAP setting) or ``"cluster"`` (SSDO's constrained-clustering prior).
    n_clusters : number of clusters of the ``"cluster"`` prior.
    n_estimators, max_samples : of the Isolation Forest prior.
    contamination : share of anomalies used to calibrate ``predict_proba`` when no labelled anomaly was given
        (required then); with labelled anomalies m is their number and this is ignored.
    random_state : seed of the Isolation Forest / the clustering.
    batch_size : rows scored at a time (bounds the memory of the distance matrices).
    """

    def __init__(self, k: int = 10, alpha: float = 2.3, n_clusters: int = 10, prior: str = "iforest",
                 n_estimators: int = 100, max_samples: float | str = "auto",
                 contamination: float | None = None, random_state: int | None = 0, batch_size: int = 4096) -> None:
        self.k = k
        self.alpha = alpha
        self.n_clusters = n_clusters
        self.prior = prior
        self.n_estimators = n_estimators
        self.max_samples = max_samples
        self.contamination = contamination
        self.random_state = random_state
        self.batch_size = batch_size

    # ------------------------------------------------------------------ fitting
    def fit(self, X, y=None) -> SSDO:
        """Fit on training features ``X`` (n × d) and labels ``y`` (1 anomaly, -1 normal, 0 unlabelled; None: all 0)."""
        self._check_params()
        X = check_features(X, "X")
        if len(X) < 2:
            raise ValueError("SSDO needs at least 2 training examples")
        y = _check_labels(y, len(X))
        self.n_features_in_ = X.shape[1]

        self._fit_prior(X, y)
        self.eta_ = self._eta(X)
        self.X_anomalies_ = X[y == 1].copy()
        self.X_normals_ = X[y == -1].copy()
        self.n_labelled_anomalies_ = int((y == 1).sum())
        self.n_labelled_normals_ = int((y == -1).sum())

        self.train_scores_ = self.decision_function(X)
        self.scaler_ = self._fit_scaler(self.train_scores_, len(X))
        return self

    def _check_params(self) -> None:
        if self.prior not in _PRIORS:
            raise ValueError(f"prior must be one of {_PRIORS}, got {self.prior!r}")
        if int(self.k) != self.k or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        if not np.isfinite(self.alpha) or self.alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {self.alpha!r}")
        if int(self.n_clusters) != self.n_clusters or self.n_clusters < 1:
            raise ValueError(f"n_clusters must be a positive integer, got {self.n_clusters!r}")
        if self.contamination is not None and not 0 < self.contamination < 1:
            raise ValueError(f"contamination must lie in (0, 1), got {self.contamination!r}")

    def _fit_prior(self, X: np.ndarray, y: np.ndarray) -> None:
        if self.prior == "iforest":
            self.prior_model_ = IsolationForest(n_estimators=self.n_estimators, max_samples=self.max_samples,
                                                random_state=self.random_state).fit(X)
        else:
            km = _ConstrainedKMeans(int(self.n_clusters), self.random_state).fit(X, y)
            centers, labels = km.cluster_centers_, km.labels_
            c = len(centers)
            dist = np.sqrt(np.maximum(((X - centers[labels]) ** 2).sum(axis=1), 0.0))
            max_intra = np.zeros(c)
            np.maximum.at(max_intra, labels, dist)
            sizes = np.bincount(labels, minlength=c).astype(np.float64)
            if c == 1:
                isolation = np.ones(1)
            else:
                cc = np.sqrt(_sq_dists(centers, centers))
                cc[np.eye(c, dtype=bool) | (cc < _TOL)] = np.inf
                nearest = cc.min(axis=1)
                nearest[~np.isfinite(nearest)] = 0.0
                isolation = nearest / max(nearest.max(), _TOL)
            self.cluster_centers_ = centers
            self.cluster_max_distance_ = max_intra
            self.cluster_isolation_ = isolation
            self.cluster_relative_size_ = sizes / sizes.max()
        raw = self._raw_prior(X)
        self.prior_min_, self.prior_max_ = float(raw.min()), float(raw.max())

    def _raw_prior(self, X: np.ndarray) -> np.ndarray:
        if self.prior == "iforest":
            return -self.prior_model_.score_samples(X)
        D = _sq_dists(X, self.cluster_centers_)
        labels = D.argmin(axis=1)
        dist = np.sqrt(np.maximum(D[np.arange(len(X)), labels], 0.0))
        radius = self.cluster_max_distance_[labels]
        deviation = np.where(radius < _TOL, 1.0, dist / np.maximum(radius, _TOL))
        return deviation * self.cluster_isolation_[labels] / self.cluster_relative_size_[labels]

    def _eta(self, X: np.ndarray) -> float:
        k = int(min(self.k, len(X) - 1))
        nn = NearestNeighbors(n_neighbors=k + 1).fit(X)
        d = nn.kneighbors(X, return_distance=True)[0][:, -1]
        if (d > 0).any():
            d = np.where(d > 0, d, d[d > 0].min())
            eta = len(d) / np.sum(1.0 / d)
        else:  # every example duplicates its k neighbours
            eta = 0.0
        return float(max(eta, 1e-8))

    def _fit_scaler(self, scores: np.ndarray, n: int):
        if self.n_labelled_anomalies_ > 0:
            return SquashingScaler(n_anomalies=self.n_labelled_anomalies_).fit(scores)
        if self.contamination is None:
            return None  # predict_proba says what is missing
        return SquashingScaler(contamination=self.contamination).fit(scores)

    # ------------------------------------------------------------------ scoring
    def _check_fitted(self) -> None:
        if not hasattr(self, "scaler_"):
            raise RuntimeError("SSDO.fit(X, y) must be called first")
        if self.scaler_ is None:
            raise ValueError("SSDO.predict_proba is calibrated so that the m labelled anomalies' worth of training "
                             "examples lie above 0.5; it was fitted without labelled anomalies (no y == 1): pass "
                             "contamination= (the expected share of anomalies) to SSDO")

    def score_prior(self, X) -> np.ndarray:
        """The unsupervised prior p(x) in [0, 1] (min-max scaled on the training set, clipped)."""
        if not hasattr(self, "prior_min_"):
            raise RuntimeError("SSDO.fit(X, y) must be called first")
        X = check_features(X, "X", self.n_features_in_)
        return self._prior(X)

    def _prior(self, X: np.ndarray) -> np.ndarray:
        span = self.prior_max_ - self.prior_min_
        if span <= _TOL:
            return np.zeros(len(X))
        return np.clip((self._raw_prior(X) - self.prior_min_) / span, 0.0, 1.0)

    def decision_function(self, X) -> np.ndarray:
        """Anomaly scores in [0, 1], higher = more anomalous."""
        if not hasattr(self, "eta_"):
            raise RuntimeError("SSDO.fit(X, y) must be called first")
        X = check_features(X, "X", self.n_features_in_)
        out = np.empty(len(X))
        step = max(1, int(self.batch_size))
        for start in range(0, len(X), step):
            chunk = X[start:start + step]
            prior = self._prior(chunk)
            wa = self._weights(chunk, self.X_anomalies_)
            wn = self._weights(chunk, self.X_normals_)
            out[start:start + step] = (prior + self.alpha * wa) / (1.0 + self.alpha * (wa + wn))
        return out

    def _weights(self, X: np.ndarray, L: np.ndarray) -> np.ndarray:
        """Σ_l 2^{-(d(x, x_l)/η)²} for each row of X."""
        if len(L) == 0:
            return np.zeros(len(X))
        return np.exp(-np.log(2.0) * _sq_dists(X, L) / self.eta_ ** 2).sum(axis=1)

    def predict_proba(self, X) -> np.ndarray:
        """n × 2: column 0 P(normal), column 1 P(anomaly) through the squashing scaler."""
        self._check_fitted()
        p = np.clip(np.asarray(self.scaler_.transform(self.decision_function(X)), dtype=np.float64), 0.0, 1.0)
        return np.column_stack([1.0 - p, p])

    def predict(self, X) -> np.ndarray:
        """1 where P(anomaly) > 0.5, else 0."""
        return (self.predict_proba(X)[:, 1] > 0.5).astype(np.int64)

    def fit_predict(self, X, y=None) -> np.ndarray:
        return self.fit(X, y).predict(X)

    def __repr__(self) -> str:
        return (f"SSDO(k={self.k}, alpha={self.alpha}, prior={self.prior!r}, n_clusters={self.n_clusters}, "
                f"random_state={self.random_state})")
