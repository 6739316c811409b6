"""Time of EAP on 10k auxiliary × 10k training points, 32-D, against a naive per-point loop (feeds the table "EAP
speed" of docs/results/performance.md).

Data (seeded): ``--n-train`` training points (default 10 000) of which ``--anomalies`` (default 100) are labelled
anomalies (normals ~ N(0, I), anomalies ~ N(0, I) shifted by 3 along every axis / sqrt(d), i.e. at distance 3),
and ``--n-aux`` auxiliary anomalies (default 10 000: a third like the labelled anomalies, a third from the normal
distribution, a third far away), in ``--dim`` (default 32) dimensions.

Results, one JSON object per line (``name``, ``params``, ``seconds``, ``ratio``, ``device`` "cpu"):

* ``k_hat``: the vectorised k̂ search (:func:`anomgen.quality.rarity.k_hat`).
* ``rarity_density_vectorised``: :class:`~anomgen.quality.rarity.RarityDensity` at k̂ -- the ball radii and the
  training points' own rarity (one chunked pass over the training pairs) and the density of every auxiliary point.
* ``rarity_density_naive``: the same quantities with a Python loop over points, each point's distances to all ball
  centres computed with numpy one point at a time (radii by a partial sort per point, then the rarity of every
  training normal and of every auxiliary point). A full run of it takes long, so each of the three loops is timed
  on ``--naive-points`` points (default 200) and extrapolated linearly to all points (``extrapolated_from`` says
  so); its values on those points are checked against the vectorised ones.
* ``eap_total``: ``EAP(num_subsets=0)`` fit + score_samples end to end, with the default detector SSDO(k=10) (or,
  if ``anomgen.detectors.ssdo`` cannot be imported, a kNN-distance stand-in; ``detector`` says which), and
  ``detector_fit`` / ``detector_score`` seconds of that detector alone on the same data, for reference.

``ratio`` = seconds of ``rarity_density_naive`` / seconds of this result (how many times faster than the naive
rarity density; the detector is not part of that comparison). Torch threads are reported in ``params``.

    python benchmarks/eap_speed.py                       # the page's setting, ~ a minute on 2 cores
    python benchmarks/eap_speed.py --n-train 2000 --n-aux 2000   # quick check
    python benchmarks/eap_speed.py --doc docs/results/performance.md   # also rewrite the page's table

``--doc PAGE`` rewrites the page's block ``<!-- begin: eap_speed -->`` ... ``<!-- end: ... -->`` with the command and
the table of this run; the rest of the page is left as it is.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from anomgen.quality.eap import EAP
from anomgen.quality.rarity import RarityDensity, k_hat


def make_data(n_train: int, n_aux: int, n_anom: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    shift = 3.0 / np.sqrt(dim)
    normals = rng.normal(size=(n_train - n_anom, dim))
    anomalies = rng.normal(size=(n_anom, dim)) + shift
    X = np.vstack([normals, anomalies])
    y = np.r_[np.zeros(len(normals), np.int64), np.ones(n_anom, np.int64)]
    third = n_aux // 3
    aux = np.vstack([rng.normal(size=(third, dim)) + shift, rng.normal(size=(third, dim)),
                     rng.normal(size=(n_aux - 2 * third, dim)) + 50.0])
    return X, y, aux


def naive_radius(normals: np.ndarray, i: int, k: int) -> float:
    d = np.sqrt(((normals - normals[i]) ** 2).sum(axis=1))
    d[i] = np.inf
    return float(np.partition(d, k - 1)[k - 1])


def naive_rarity(normals: np.ndarray, radii: np.ndarray, x: np.ndarray, own: int | None = None) -> float:
    d = np.sqrt(((normals - x) ** 2).sum(axis=1))
    if own is not None:
        d[own] = 0.0
    inside = (d <= radii) & (radii > 0)
    return float(radii[inside].min()) if inside.any() else 0.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=10_000)
    parser.add_argument("--n-aux", type=int, default=10_000)
    parser.add_argument("--anomalies", type=int, default=100)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--naive-points", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--doc", default=None, help="a page of docs/results/ whose block this run's table rewrites")
    args = parser.parse_args(argv)

    X, y, aux = make_data(args.n_train, args.n_aux, args.anomalies, args.dim, args.seed)
    normals, anomalies = X[y == 0], X[y == 1]
    base = {"n_train": len(X), "n_normal": len(normals), "n_anomalies": len(anomalies), "n_aux": len(aux),
            "dim": args.dim, "torch_threads": torch.get_num_threads()}
    results = []

    t = time.perf_counter()
    k = k_hat(normals, anomalies, min_k=5)
    results.append({"name": "k_hat", "params": {**base, "min_k": 5, "k_hat": k}, "seconds": time.perf_counter() - t})

    t = time.perf_counter()
    model = RarityDensity(k).fit(normals)
    density = model.density(aux)
    vec_seconds = time.perf_counter() - t
    results.append({"name": "rarity_density_vectorised", "params": {**base, "k": k}, "seconds": vec_seconds})

    # naive: Python loops over points, each timed on a few points and extrapolated linearly
    rng = np.random.default_rng(args.seed + 1)
    p = min(args.naive_points, len(normals), len(aux))
    idx_n, idx_q = rng.choice(len(normals), p, replace=False), rng.choice(len(aux), p, replace=False)
    t = time.perf_counter()
    naive_r = np.array([naive_radius(normals, i, k) for i in idx_n])
    t_radius = (time.perf_counter() - t) / p
    radii = model.radii_  # the loops below need every radius; their own time is extrapolated from t_radius
    t = time.perf_counter()
    naive_own = np.array([naive_rarity(normals, radii, normals[i], own=i) for i in idx_n])
    t_own = (time.perf_counter() - t) / p
    t = time.perf_counter()
    naive_q = np.array([naive_rarity(normals, radii, aux[i]) for i in idx_q])
    t_query = (time.perf_counter() - t) / p
    np.testing.assert_allclose(naive_r, radii[idx_n], rtol=1e-9)
    np.testing.assert_allclose(naive_own, model.rarity_normal_[idx_n], rtol=1e-9)
    np.testing.assert_allclose(naive_q, model.rarity(aux[idx_q]), rtol=1e-9)
    naive_seconds = (t_radius + t_own) * len(normals) + t_query * len(aux)
    results.append({"name": "rarity_density_naive", "params": {**base, "k": k}, "seconds": naive_seconds,
                    "extrapolated_from": f"{p} points per loop (radii, training rarity, auxiliary rarity), "
                                         "scaled linearly to all points"})

    try:
        from anomgen.detectors.ssdo import SSDO

        detector, detector_name = SSDO(k=10), "SSDO(k=10), Isolation Forest prior"
    except ImportError:
        from sklearn.neighbors import NearestNeighbors

        class KNNDistance:
            def fit(self, X, y):
                self.nn_ = NearestNeighbors(n_neighbors=10).fit(X[y == 0])
                return self

            def decision_function(self, X):
                return self.nn_.kneighbors(X)[0][:, -1]

        detector, detector_name = KNNDistance(), "kNN distance stand-in (SSDO not importable)"
    t = time.perf_counter()
    scorer = EAP(detector=detector, num_subsets=0).fit(X, y)
    t_fit = time.perf_counter() - t
    phi = scorer.score_samples(aux)
    eap_seconds = time.perf_counter() - t
    t = time.perf_counter()
    det = type(detector)() if detector_name.startswith("kNN") else SSDO(k=10)
    det.fit(X, y)
    t_det_fit = time.perf_counter() - t
    det.decision_function(X)
    det.decision_function(aux)
    t_det_score = time.perf_counter() - t - t_det_fit
    assert np.isfinite(phi).all() and np.isfinite(density).all()
    results.append({"name": "eap_total", "params": {**base, "num_subsets": 0, "detector": detector_name,
                                                    "k_hat": scorer.k_hats_[0]},
                    "seconds": eap_seconds, "fit_seconds": t_fit, "score_seconds": eap_seconds - t_fit,
                    "detector_fit_seconds": t_det_fit, "detector_score_seconds": t_det_score})

    for r in results:
        r["ratio"] = naive_seconds / r["seconds"]
        r["device"] = "cpu"
        print(json.dumps(r))
    if args.doc:
        write_table(args, {r["name"]: r for r in results}, argv)


def write_table(args: argparse.Namespace, results: dict[str, dict], argv: list[str] | None) -> None:
    import sys

    from docpage import table, write_doc

    def sec(s: float) -> str:
        return f"{s:.1f}" if s >= 10 else f"{s:.2f}"

    naive, vec = results["rarity_density_naive"], results["rarity_density_vectorised"]
    body = table(["step", "seconds", "ratio to the naive loop"], [
        [f"rarity density, naive per-point loop (timed on {args.naive_points} points, scaled linearly)",
         sec(naive["seconds"]), "1.0"],
        [f"rarity density, vectorised and chunked (k̂ = {vec['params']['k']})", sec(vec["seconds"]),
         f"{vec['ratio']:.1f}× faster"],
        ["k̂ (exact minimal k per labelled anomaly, Beta posterior)", sec(results["k_hat"]["seconds"]), None],
        ["EAP in all (SSDO fit + k̂ + density + scoring)", sec(results["eap_total"]["seconds"]), None]])
    p = vec["params"]
    note = (f"{p['n_aux']:,} auxiliary × {p['n_train']:,} training points ({p['n_anomalies']} labelled anomalies), "
            f"{p['dim']}-D, CPU ({p['torch_threads']} torch threads), no bootstrap.")
    write_doc(args.doc, "eap_speed", "eap_speed.py", sys.argv[1:] if argv is None else argv, body, note)


if __name__ == "__main__":
    main()
