"""Rarity score, the rarity density P̂(X = x) and the neighbourhood size k̂ that EAP uses.

Balls. Around every normal training point x_i there is a ball of radius r_k(x_i): the Euclidean distance from x_i to
its k-th nearest neighbour among the *other* normal training points (duplicates of x_i count as neighbours at
distance 0; x_i itself does not).

Rarity. A point x is *inside* ball i when ``dist(x, x_i) <= r_k(x_i)`` (the boundary belongs to the ball) and the
radius is positive: a ball of radius 0 (x_i has k or more exact duplicates) holds nothing, since 1 / 0 has no
meaning in the density below. The rarity r(x) is the smallest radius among the balls that hold x, and 0 when x is
inside no ball. Higher rarity = rarer (x lies only in wide balls, i.e. in a sparse region).

Density. P̂(X = x) = (1 / r(x)) / (1 / r(x) + Σ_i 1 / r(x_i)), where the sum runs over the normal training points
with their own rarity (a training point is inside its own ball, so r(x_i) > 0 unless its ball has radius 0, in which
case the point adds nothing to the sum). P̂ = 0 for a point inside no ball.

k̂. For each labelled anomaly, the smallest k >= ``min_k`` that puts it inside some ball (n_normal − 1 if even the
widest balls miss it). These are normalised to p*_j = (k_j − min_k) / (n_normal − 1 − min_k), a Beta(1 + Σ p*,
1 + m − Σ p*) posterior is formed and its ``quantile`` (0.95) is mapped back to a k, clipped to
[min_k, n_normal − 1]. With n_normal <= min_k + 1, k̂ = n_normal − 1.

Everything is exact and vectorised (torch, float64). Distances are computed in chunks of ``chunk_size`` rows, so at
most about ``chunk_size × n_normal`` distances exist at once (10 000 × 10 000 fits in a few hundred MB). The
squared distances come from ``|a|² + |b|² − 2 a·b`` on features centred on the normal mean; ball membership is
decided on squared distances. For the training points' own rarity the radii and the memberships come from the same
distance entries, so a point exactly on a ball's boundary (the k-th neighbour of the centre) is always inside.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import beta as beta_dist

from anomgen.detectors.arrays import check_features

DEFAULT_CHUNK = 1024


def _as_tensor(X) -> torch.Tensor:
    return torch.as_tensor(np.ascontiguousarray(X, dtype=np.float64))


class _Geometry:
    """The normal training points, centred, with their squared norms (shared by every distance computation)."""

    def __init__(self, X_normal, chunk_size: int = DEFAULT_CHUNK):
        X_normal = check_features(X_normal, "X_normal")
        if len(X_normal) < 2:
            raise ValueError(f"the rarity score needs at least 2 normal points (a ball's radius is the distance to "
                             f"another normal point), got {len(X_normal)}")
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.chunk = int(chunk_size)
        self.mean = X_normal.mean(axis=0)
        self.X = _as_tensor(X_normal - self.mean)
        self.sq = (self.X**2).sum(1)
        self.n, self.dim = self.X.shape

    def prepare(self, X_query, name: str = "X_query") -> torch.Tensor:
        X_query = check_features(X_query, name, self.dim)
        return _as_tensor(X_query - self.mean)

    def sq_dist(self, Q: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Squared distances from the rows of Q (already prepared) to every normal point: len(Q) × n (written into
        ``out`` when given: a reused buffer spares the allocation of every chunk)."""
        if out is not None:
            out = out[: len(Q)]
            d2 = torch.addmm(self.sq.unsqueeze(0), Q, self.X.T, beta=1.0, alpha=-2.0, out=out)
        else:
            d2 = torch.addmm(self.sq.unsqueeze(0), Q, self.X.T, beta=1.0, alpha=-2.0)
        d2 += (Q**2).sum(1, keepdim=True)
        return d2.clamp_min_(0.0)

    def buffer(self, rows: int) -> torch.Tensor:
        return torch.empty(min(rows, self.chunk), self.n, dtype=torch.float64)

    def chunks(self, length: int):
        for start in range(0, length, self.chunk):
            yield start, min(start + self.chunk, length)


def _check_k(k, n_normal: int) -> int:
    if int(k) != k or not 1 <= int(k) <= n_normal - 1:
        raise ValueError(f"k must be an integer in [1, n_normal - 1] = [1, {n_normal - 1}] (the k-th neighbour among "
                         f"the other normal points), got {k}")
    return int(k)


def _kth_smallest(d2: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest entry of every row (rows hold one +inf, the point itself, and n - 1 distances)."""
    n = d2.shape[1]
    if k <= n - k + 1:
        return torch.topk(d2, k, dim=1, largest=False, sorted=False).values.amax(1)
    return torch.topk(d2, n - k + 1, dim=1, largest=True, sorted=False).values.amin(1)


def _normal_pass(geo: _Geometry, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared radii of all balls and the own rarity (squared) of every normal point, in one pass over the pairs."""
    n = geo.n
    radii2 = torch.empty(n, dtype=torch.float64)
    own2 = torch.full((n,), float("inf"), dtype=torch.float64)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    buf = geo.buffer(n)
    for a, b in geo.chunks(n):
        d2 = geo.sq_dist(geo.X[a:b], out=buf)
        rows, cols = torch.arange(b - a), torch.arange(a, b)
        d2[rows, cols] = float("inf")  # a point is not its own neighbour
        r2 = _kth_smallest(d2, k)
        radii2[a:b] = r2
        d2[rows, cols] = 0.0  # ... but it lies inside its own ball
        thr = torch.where(r2 > 0, r2, torch.full_like(r2, -1.0)).unsqueeze(1)  # a ball of radius 0 holds nothing
        inside = d2 <= thr
        cand = torch.where(inside, r2.unsqueeze(1), inf, out=d2)
        torch.minimum(own2, cand.amin(0), out=own2)
    own2[torch.isinf(own2)] = 0.0
    return radii2, own2


def _query_rarity2(geo: _Geometry, Q: torch.Tensor, radii2: torch.Tensor) -> torch.Tensor:
    """Squared rarity of prepared queries against balls of squared radii ``radii2`` (0 = inside no ball).

    The balls are visited in increasing radius, so a query's rarity is the radius of the first ball that holds it.
    """
    order = torch.argsort(radii2, stable=True)
    r2 = radii2[order]
    thr = torch.where(r2 > 0, r2, torch.full_like(r2, -1.0)).unsqueeze(0)  # a ball of radius 0 holds nothing
    X, sq = geo.X[order], geo.sq[order]
    out = torch.zeros(len(Q), dtype=torch.float64)
    buf = geo.buffer(len(Q))
    for a, b in geo.chunks(len(Q)):
        q = Q[a:b]
        d2 = torch.addmm(sq.unsqueeze(0), q, X.T, beta=1.0, alpha=-2.0, out=buf[: b - a])
        d2 += (q**2).sum(1, keepdim=True)
        d2.clamp_min_(0.0)
        inside = d2 <= thr
        first = inside.view(torch.uint8).argmax(1)
        hit = inside.any(1)
        out[a:b] = torch.where(hit, r2[first], torch.zeros_like(r2[first]))
    return out


def knn_radii(X_normal, k: int, chunk_size: int = DEFAULT_CHUNK) -> np.ndarray:
    """Radius of every ball: the distance from each normal point to its k-th nearest other normal point (n,)."""
    geo = _Geometry(X_normal, chunk_size)
    k = _check_k(k, geo.n)
    radii2 = torch.empty(geo.n, dtype=torch.float64)
    buf = geo.buffer(geo.n)
    for a, b in geo.chunks(geo.n):
        d2 = geo.sq_dist(geo.X[a:b], out=buf)
        d2[torch.arange(b - a), torch.arange(a, b)] = float("inf")
        radii2[a:b] = _kth_smallest(d2, k)
    return radii2.sqrt().numpy()


def rarity_score(X_normal, X_query=None, k: int = 10, chunk_size: int = DEFAULT_CHUNK) -> np.ndarray:
    """Rarity of every query: the smallest radius of a k-NN ball (around the normal points) that holds it, 0 outside
    all balls. ``X_query=None`` scores the normal points themselves (each inside its own ball)."""
    geo = _Geometry(X_normal, chunk_size)
    k = _check_k(k, geo.n)
    radii2, own2 = _normal_pass(geo, k)
    if X_query is None:
        return own2.sqrt().numpy()
    return _query_rarity2(geo, geo.prepare(X_query), radii2).sqrt().numpy()


def density_from_rarity(rarity_query, rarity_normal) -> np.ndarray:
    """P̂(X = x) = (1/r(x)) / (1/r(x) + Σ_i 1/r(x_i)); 0 where r(x) = 0; normal points with r = 0 add nothing."""
    rq = np.asarray(rarity_query, dtype=np.float64)
    rn = np.asarray(rarity_normal, dtype=np.float64)
    total = np.sum(1.0 / rn[rn > 0])
    inv = np.zeros_like(rq)
    np.divide(1.0, rq, out=inv, where=rq > 0)
    return np.where(rq > 0, inv / (inv + total), 0.0)


class RarityDensity:
    """The rarity density of one set of normal points at one k, fitted once and evaluated on any queries."""

    def __init__(self, k: int, chunk_size: int = DEFAULT_CHUNK):
        self.k = k
        self.chunk_size = chunk_size

    def fit(self, X_normal) -> RarityDensity:
        self.geo_ = _Geometry(X_normal, self.chunk_size)
        self.k_ = _check_k(self.k, self.geo_.n)
        radii2, own2 = _normal_pass(self.geo_, self.k_)
        self.radii2_ = radii2
        self.radii_ = radii2.sqrt().numpy()
        self.rarity_normal_ = own2.sqrt().numpy()
        return self

    @property
    def n_normal(self) -> int:
        return self.geo_.n

    def rarity(self, X_query) -> np.ndarray:
        return _query_rarity2(self.geo_, self.geo_.prepare(X_query), self.radii2_).sqrt().numpy()

    def density(self, X_query) -> np.ndarray:
        return density_from_rarity(self.rarity(X_query), self.rarity_normal_)


def rarity_density(X_normal, X_query, k: int, chunk_size: int = DEFAULT_CHUNK) -> np.ndarray:
    """P̂(X = x) of every query from the k-NN balls around the normal points (0 outside all balls)."""
    return RarityDensity(k, chunk_size).fit(X_normal).density(X_query)


def _candidate_bound(geo: _Geometry, A: torch.Tensor, candidates: int) -> np.ndarray:
    """For each anomaly, the smallest k at which one of the balls around its nearest normal points holds it
    (an upper bound of its minimal k; n_normal when none of them does at any k)."""
    L = min(candidates, geo.n)
    out = np.empty(len(A), dtype=np.int64)
    step = max(1, geo.chunk // L)
    for a in range(0, len(A), step):
        t2 = geo.sq_dist(A[a:a + step])  # anomalies × n
        cand = torch.topk(t2, L, dim=1, largest=False).indices
        t = t2.gather(1, cand).reshape(-1, 1)
        rows = cand.reshape(-1)
        d2 = geo.sq_dist(geo.X[rows])
        d2[torch.arange(len(rows)), rows] = float("inf")
        k = torch.maximum((d2 < t).sum(1), (d2 <= 0).sum(1)) + 1
        out[a:a + step] = k.reshape(-1, L).amin(1).numpy()
    return out


def minimal_k(X_normal, X_anomalies, min_k: int = 5, chunk_size: int = DEFAULT_CHUNK,
              candidates: int = 16) -> np.ndarray:
    """For each anomaly, the smallest k >= ``min_k`` whose k-NN balls around the normal points hold it
    (n_normal − 1 when none does; never above n_normal − 1).

    Ball i holds anomaly a at k exactly when the k-th smallest distance s_i[k] from x_i to the other normal points
    satisfies s_i[k] >= dist(a, x_i) and s_i[k] > 0; so the smallest such k is found with a sorted search in the
    sorted neighbour distances of every x_i. These lists are built for the K nearest neighbours only. K starts at an
    upper bound of the answer taken from the balls around the ``candidates`` normal points nearest to each anomaly
    (their exact k's, one row of distances each) and is doubled (up to n_normal − 1) for the anomalies that no ball
    holds yet.
    """
    geo = _Geometry(X_normal, chunk_size)
    A = geo.prepare(X_anomalies, "X_anomalies")
    if int(min_k) != min_k or min_k < 1:
        raise ValueError(f"min_k must be an integer >= 1, got {min_k}")
    min_k = int(min_k)
    n, kmax = geo.n, geo.n - 1
    result = np.full(len(A), kmax, dtype=np.int64)
    remaining = np.arange(len(A))
    bound = _candidate_bound(geo, A, candidates)
    covered = bound[bound <= kmax]
    K = int(min(kmax, max(min_k, covered.max() if len(covered) else 2 * min_k)))
    while len(remaining):
        Ar = A[remaining]
        Ar_sq = (Ar**2).sum(1)
        best = torch.full((len(remaining),), np.iinfo(np.int64).max, dtype=torch.int64)
        buf = geo.buffer(n)
        for a, b in geo.chunks(n):
            d2 = geo.sq_dist(geo.X[a:b], out=buf)
            d2[torch.arange(b - a), torch.arange(a, b)] = float("inf")
            s2 = torch.topk(d2, K, dim=1, largest=False, sorted=True).values  # chunk × K, ascending
            t2 = torch.addmm(Ar_sq.unsqueeze(0), geo.X[a:b], Ar.T, beta=1.0, alpha=-2.0)  # chunk × anomalies
            t2 += geo.sq[a:b].unsqueeze(1)
            t2.clamp_min_(0.0)
            pos = torch.searchsorted(s2, t2, side="left")  # first neighbour rank with s >= t
            zeros = (s2 <= 0).sum(1, keepdim=True)  # ... that is also a positive radius
            pos = torch.maximum(pos, zeros)
            ks = torch.where(pos < K, pos + 1, torch.full_like(pos, np.iinfo(np.int64).max))
            best = torch.minimum(best, ks.min(0).values)
        best = best.numpy()
        found = best <= K
        result[remaining[found]] = np.maximum(best[found], min_k)
        remaining = remaining[~found]
        if K == kmax:
            break
        K = min(kmax, 2 * K)
    return np.minimum(result, kmax)


def k_hat_from_minimal(k_values, n_normal: int, min_k: int = 5, quantile: float = 0.95) -> int:
    """k̂ from the per-anomaly minimal k's: the ``quantile`` of the Beta posterior on their normalised values."""
    if n_normal <= min_k + 1:
        return int(n_normal - 1)
    k_values = np.asarray(k_values, dtype=np.float64).reshape(-1)
    span = n_normal - 1 - min_k
    pstar = (k_values - min_k) / span
    a = 1.0 + pstar.sum()
    b = 1.0 + len(pstar) - pstar.sum()
    k = int(beta_dist.ppf(quantile, a, b) * span + min_k)
    return int(min(max(k, min_k), n_normal - 1))


def k_hat(X_normal, X_anomalies, min_k: int = 5, quantile: float = 0.95, chunk_size: int = DEFAULT_CHUNK) -> int:
    """The neighbourhood size k̂ for the rarity density, calibrated so that the labelled anomalies fall in balls."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    n_normal = len(check_features(X_normal, "X_normal"))
    if n_normal < 2:
        raise ValueError(f"k_hat needs at least 2 normal points, got {n_normal}")
    if n_normal <= min_k + 1:
        check_features(X_anomalies, "X_anomalies", np.shape(X_normal)[1])
        return n_normal - 1
    ks = minimal_k(X_normal, X_anomalies, min_k, chunk_size)
    return k_hat_from_minimal(ks, n_normal, min_k, quantile)
