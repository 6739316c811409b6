"""Data-valuation baselines for the quality of auxiliary anomalies: leave-one-out, KNN-Shapley and Data-OOB.

Each scorer values an auxiliary anomaly by what it is worth as a *training example with label 1*. The pool of
training examples is the training set (its labels: 1 labelled anomaly, 0 normal / unlabelled) plus every auxiliary
anomaly labelled 1; the value of each auxiliary anomaly is computed within that pool (so the values of auxiliary
anomalies depend on one another, as data values do). Higher = more valuable = a better auxiliary anomaly.

**Validation set.** Leave-one-out and KNN-Shapley judge a classifier trained on the pool against a validation set.
By default it is the training set's own labelled data (normals y = 0, labelled anomalies y = 1): no extra data is
needed, which matches the EAP setting where the only labels are those of the training set. A validation example is
then never used to classify itself: for the kNN classifiers, validation example j is classified by the pool without
j (for KNN-Shapley this is exact: the value of the game "mean over j of the kNN accuracy on j of S ∖ {j}", since j is
a null player of its own term). A separate validation set, as in the paper's evaluation with opendataval, can be
given: ``fit(X, y, X_val=..., y_val=...)``. Data-OOB needs no validation set: it is an out-of-bag estimate.

- :class:`LeaveOneOut`: ``value_i = perf(pool) − perf(pool ∖ {i})``. Default classifier: k-nearest neighbours
  (k = 5) with P(anomaly | x) = the share of anomalies among the k nearest pool examples, computed from one
  neighbour search (removing i only changes the validation examples that have i among their k neighbours: their
  (k + 1)-th neighbour takes its place). Default performance: AUROC of that probability on the validation set (the
  anomaly class is rare, accuracy would hardly move); ``metric="accuracy"`` uses the majority vote (P > 0.5).
  Any scikit-learn classifier with ``predict_proba`` can be passed as ``model`` instead; it is then refitted once
  per auxiliary anomaly, and with the default validation set the validation examples are part of its training
  data (in-sample performance).
- :class:`KNNShapley`: the exact Shapley value of every pool example for the unweighted kNN classifier's
  validation accuracy (Jia et al., VLDB 2019, closed-form recursion over the pool sorted by distance to each
  validation example), averaged over the validation set; ties in distance are broken by pool order (training set
  first, then the auxiliary anomalies in the order given).
- :class:`DataOOB`: Kwon & Zou (ICML 2023). A random forest (bootstrap samples) is fitted on the pool; the value of
  auxiliary anomaly i is the share of the trees for which i is out-of-bag that predict its label (1) at x_i.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata
from sklearn.base import clone
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics.pairwise import euclidean_distances
from sklearn.neighbors import NearestNeighbors

from anomgen.detectors.arrays import check_features
from anomgen.quality.base import QualityScorer

__all__ = ["DataOOB", "KNNShapley", "LeaveOneOut"]

_METRICS = ("auroc", "accuracy")


def _auroc(y: np.ndarray, score: np.ndarray) -> float:
    """AUROC by ranks (ties count one half)."""
    pos = y == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    ranks = rankdata(score)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class _ValidatedScorer(QualityScorer):
    """Keeps the training set and the validation set (the training set itself unless one is given)."""

    needs_validation_classes: tuple[int, ...] = ()

    def fit(self, X, y, X_val=None, y_val=None) -> _ValidatedScorer:
        """Fit on the training set; optionally a separate validation set (``X_val``, ``y_val`` with labels 0/1)."""
        if (X_val is None) != (y_val is None):
            raise ValueError("give both X_val and y_val, or neither (then the training set is the validation set)")
        self._given_val = (X_val, y_val)
        try:
            return super().fit(X, y)
        finally:
            del self._given_val

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        self.X_, self.y_ = X, y
        X_val, y_val = self._given_val
        if X_val is None:
            self.X_val_, self.y_val_, self.self_validation_ = X, y, True
        else:
            self.X_val_ = check_features(X_val, "X_val", X.shape[1])
            y_val = np.asarray(y_val).reshape(-1)
            if len(y_val) != len(self.X_val_):
                raise ValueError(f"y_val has {len(y_val)} labels for {len(self.X_val_)} validation examples")
            if not np.isin(y_val, (0, 1)).all():
                raise ValueError(f"y_val must hold 0 (normal) and 1 (anomaly), got values {np.unique(y_val)}")
            self.y_val_, self.self_validation_ = y_val.astype(np.int64), False
        for c in self.needs_validation_classes:
            if not (self.y_val_ == c).any():
                raise ValueError(f"{type(self).__name__} needs validation examples of both classes (AUROC); "
                                 f"none has label {c}")

    def _pool(self, X_aux: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return np.vstack([self.X_, X_aux]), np.concatenate([self.y_, np.ones(len(X_aux), dtype=np.int64)])


class LeaveOneOut(_ValidatedScorer):
    """Leave-one-out value of each auxiliary anomaly: perf(pool) − perf(pool without it); see the module doc.

    Parameters
    ----------
    model : None for the fast k-nearest-neighbour classifier, or a scikit-learn classifier with ``predict_proba``
        (cloned and refitted once per auxiliary anomaly, plus once on the whole pool).
    k : neighbours of the default kNN classifier (at most the pool size − 1 is used).
    metric : ``"auroc"`` (of P(anomaly) on the validation set) or ``"accuracy"`` (of P(anomaly) > 0.5).
    """

    name = "loo"

    def __init__(self, model=None, k: int = 5, metric: str = "auroc") -> None:
        if metric not in _METRICS:
            raise ValueError(f"metric must be one of {_METRICS}, got {metric!r}")
        if int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        if model is not None and not hasattr(model, "fit"):
            raise TypeError(f"model must be a scikit-learn classifier (with fit / predict_proba), got {model!r}")
        self.model = model
        self.k = int(k)
        self.metric = metric
        self.needs_anomalies = metric == "auroc"
        self.needs_validation_classes = (0, 1) if metric == "auroc" else ()

    def _perf(self, p_anomaly: np.ndarray, half: float = 0.5) -> float:
        """AUROC of the score, or accuracy of ``score > half`` (the kNN path passes integer counts: no rounding
        breaks ties between equal shares)."""
        if self.metric == "auroc":
            return _auroc(self.y_val_, p_anomaly)
        return float(np.mean((p_anomaly > half).astype(np.int64) == self.y_val_))

    def _score(self, X_aux: np.ndarray) -> np.ndarray:
        if self.model is None:
            return self._score_knn(X_aux)
        return self._score_model(X_aux)

    def _score_model(self, X_aux: np.ndarray) -> np.ndarray:
        Xp, yp = self._pool(X_aux)
        n = len(self.X_)

        def perf(keep: np.ndarray) -> float:
            model = clone(self.model).fit(Xp[keep], yp[keep])
            classes = list(model.classes_)
            p = model.predict_proba(self.X_val_)[:, classes.index(1)] if 1 in classes else np.zeros(len(self.X_val_))
            return self._perf(p)

        keep = np.ones(len(Xp), dtype=bool)
        full = perf(keep)
        values = np.empty(len(X_aux))
        for a in range(len(X_aux)):
            keep[n + a] = False
            values[a] = full - perf(keep)
            keep[n + a] = True
        return values

    def _score_knn(self, X_aux: np.ndarray) -> np.ndarray:
        Xp, yp = self._pool(X_aux)
        n, V = len(self.X_), len(self.X_val_)
        n_eff = len(Xp) - int(self.self_validation_)  # pool size seen by a validation example
        if n_eff < 2:
            raise ValueError("leave-one-out needs at least 2 pool examples besides each validation example")
        k = min(self.k, n_eff - 1)
        extra = int(self.self_validation_)
        idx = NearestNeighbors(n_neighbors=k + 1 + extra).fit(Xp).kneighbors(self.X_val_, return_distance=False)
        if self.self_validation_:  # drop each validation example from its own neighbour list
            is_self = idx == np.arange(V)[:, None]
            idx = np.take_along_axis(idx, np.argsort(is_self, axis=1, kind="stable"), axis=1)[:, :k + 1]
        labels = yp[idx]
        count_full = labels[:, :k].sum(axis=1)  # anomalies among the k neighbours: P(anomaly) = count / k
        full = self._perf(count_full, k / 2)

        # removing aux point a changes exactly the validation rows having a among their k neighbours
        rows, cols = np.nonzero(idx[:, :k] >= n)
        aux_of_hit = idx[rows, cols] - n
        order = np.argsort(aux_of_hit, kind="stable")
        rows, aux_of_hit = rows[order], aux_of_hit[order]
        bounds = np.searchsorted(aux_of_hit, np.arange(len(X_aux) + 1))
        replacement = labels[:, k] - 1  # the (k + 1)-th neighbour replaces a point labelled 1
        values = np.zeros(len(X_aux))
        for a in range(len(X_aux)):
            r = rows[bounds[a]:bounds[a + 1]]
            if len(r) == 0:
                continue  # no validation example has it among its neighbours: removing it changes nothing
            count = count_full.copy()
            count[r] += replacement[r]
            values[a] = full - self._perf(count, k / 2)
        return values


class KNNShapley(_ValidatedScorer):
    """Exact KNN-Shapley (Jia et al. 2019) of each auxiliary anomaly within the pool; see the module doc.

    Utility of a subset S for validation example (x, y): (1/k) Σ_{j ≤ min(k, |S|)} 1[y_{α_j(S)} = y], α_j(S) the
    j-th nearest example of S to x (Euclidean); the value is averaged over the validation set.
    """

    name = "knn_shapley"
    needs_anomalies = False

    def __init__(self, k: int = 5, batch_size: int = 256) -> None:
        if int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        self.k = int(k)
        self.batch_size = batch_size

    def pool_values(self, X_aux) -> np.ndarray:
        """KNN-Shapley values of the whole pool: the training examples first, then the auxiliary anomalies."""
        if not hasattr(self, "n_features_in_"):
            raise RuntimeError("KNNShapley.fit(X, y) must be called before pool_values")
        X_aux = check_features(X_aux, "X_aux", self.n_features_in_)
        return self._pool_values(X_aux)

    def _score(self, X_aux: np.ndarray) -> np.ndarray:
        return self._pool_values(X_aux)[len(self.X_):]

    def _pool_values(self, X_aux: np.ndarray) -> np.ndarray:
        Xp, yp = self._pool(X_aux)
        N, V, K = len(Xp), len(self.X_val_), self.k
        n_eff = N - int(self.self_validation_)
        if n_eff < 1:
            raise ValueError("KNN-Shapley needs at least one pool example besides each validation example")
        ranks = np.arange(1, n_eff)  # i = 1 .. n_eff - 1
        coef = np.minimum(K, ranks) / (ranks * K)
        totals = np.zeros(N)
        step = max(1, int(self.batch_size))
        for start in range(0, V, step):
            stop = min(V, start + step)
            D = euclidean_distances(self.X_val_[start:stop], Xp, squared=True)
            if self.self_validation_:
                D[np.arange(stop - start), np.arange(start, stop)] = np.inf
            order = np.argsort(D, axis=1, kind="stable")[:, :n_eff]  # α_1 .. α_n_eff
            match = (yp[order] == self.y_val_[start:stop, None]).astype(np.float64)
            s = np.empty_like(match)
            s[:, -1] = match[:, -1] / n_eff
            if n_eff > 1:
                step_up = (match[:, :-1] - match[:, 1:]) * coef  # s_i - s_{i+1}
                s[:, :-1] = s[:, -1:] + np.cumsum(step_up[:, ::-1], axis=1)[:, ::-1]
            totals += np.bincount(order.ravel(), weights=s.ravel(), minlength=N)
        return totals / V


class DataOOB(QualityScorer):
    """Data-OOB (Kwon & Zou 2023) of each auxiliary anomaly with a random forest on the pool; see the module doc.

    ``forest_`` keeps the fitted forest (trees in ``estimators_``, their bootstrap indices in
    ``estimators_samples_``; pool = training set, then the auxiliary anomalies). An auxiliary anomaly that is in
    the bootstrap sample of every tree (probability about 0.63^n_estimators) is valued with all the trees.
    """

    name = "data_oob"
    needs_anomalies = False

    def __init__(self, n_estimators: int = 100, random_state: int | None = 0, max_features="sqrt",
                 n_jobs: int | None = None) -> None:
        if int(n_estimators) != n_estimators or n_estimators < 1:
            raise ValueError(f"n_estimators must be a positive integer, got {n_estimators!r}")
        self.n_estimators = int(n_estimators)
        self.random_state = random_state
        self.max_features = max_features
        self.n_jobs = n_jobs

    def _fit(self, X: np.ndarray, y: np.ndarray) -> None:
        self.X_, self.y_ = X, y

    def _score(self, X_aux: np.ndarray) -> np.ndarray:
        Xp = np.vstack([self.X_, X_aux])
        yp = np.concatenate([self.y_, np.ones(len(X_aux), dtype=np.int64)])
        n = len(self.X_)
        forest = RandomForestClassifier(n_estimators=self.n_estimators, max_features=self.max_features,
                                        bootstrap=True, random_state=self.random_state, n_jobs=self.n_jobs)
        forest.fit(Xp, yp)
        self.forest_ = forest
        X32 = X_aux.astype(np.float32)
        n_oob = np.zeros(len(X_aux))
        n_correct_oob = np.zeros(len(X_aux))
        n_correct = np.zeros(len(X_aux))
        for tree, samples in zip(forest.estimators_, forest.estimators_samples_):
            in_bag = np.zeros(len(Xp), dtype=bool)
            in_bag[samples] = True
            oob = ~in_bag[n:]
            correct = forest.classes_[tree.predict(X32).astype(np.int64)] == 1
            n_oob += oob
            n_correct_oob += oob & correct
            n_correct += correct
        never_oob = n_oob == 0
        values = np.where(never_oob, n_correct / self.n_estimators, n_correct_oob / np.maximum(n_oob, 1))
        return values
