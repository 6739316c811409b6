"""k-nearest-neighbour anomaly scoring against a bank of normal features.

The score of a query is an aggregate of its distances to the ``k`` nearest bank features:
``"squared"`` sums squared L2 distances (FITYMI, k = 2) and ``"euclidean"`` sums plain L2 distances (synthetic
validation, k = 3). The search is exact and memory-bounded: queries and bank are processed in chunks, and only the
running k smallest distances of each query are kept. ``backend="faiss"`` runs the same exact search with faiss's
flat L2 index (optional dependency: ``pip install 'anomgen[faiss]'``).
"""

from __future__ import annotations

import torch

DISTANCES = ("squared", "euclidean")
BACKENDS = ("torch", "faiss")


class KNNScorer:
    """An exact, chunked kNN scorer over a feature bank (N × D)."""

    def __init__(self, k: int = 2, distance: str = "squared", query_chunk: int = 1024, bank_chunk: int = 16384,
                 backend: str = "torch"):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if backend == "faiss":
            try:
                import faiss  # noqa: F401
            except ImportError:
                raise ImportError("backend='faiss' needs the faiss package: pip install 'anomgen[faiss]' "
                                  "(or faiss-gpu); backend='torch' needs nothing more") from None
        self.backend = backend
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        self.k, self.distance = k, distance
        self.query_chunk, self.bank_chunk = query_chunk, bank_chunk
        self.bank: torch.Tensor | None = None

    def fit(self, bank: torch.Tensor) -> KNNScorer:
        bank = torch.as_tensor(bank).float()
        if bank.dim() != 2:
            raise ValueError(f"the feature bank must be N × D, got shape {tuple(bank.shape)}")
        if len(bank) < self.k:
            raise ValueError(f"the feature bank has {len(bank)} features, fewer than k = {self.k}")
        if not torch.isfinite(bank).all():
            raise ValueError("the feature bank holds NaN or infinite values")
        self.bank = bank
        return self

    def kneighbors(self, queries: torch.Tensor) -> torch.Tensor:
        """Squared L2 distances to the k nearest bank features, ascending (M × k)."""
        if self.bank is None:
            raise RuntimeError("KNNScorer.fit(bank) must be called before scoring")
        queries = torch.as_tensor(queries).float()
        if queries.dim() != 2 or queries.shape[1] != self.bank.shape[1]:
            raise ValueError(f"queries must be M × {self.bank.shape[1]}, got shape {tuple(queries.shape)}")
        if self.backend == "faiss":
            return self._faiss_kneighbors(queries)
        bank_sq = (self.bank**2).sum(1)
        out = []
        for q in queries.split(self.query_chunk):
            q_sq = (q**2).sum(1, keepdim=True)
            best = None
            for start in range(0, len(self.bank), self.bank_chunk):
                b = self.bank[start : start + self.bank_chunk]
                d = (q_sq - 2.0 * q @ b.T + bank_sq[start : start + self.bank_chunk]).clamp_min_(0.0)
                best = d if best is None else torch.cat([best, d], dim=1)
                best = best.topk(min(self.k, best.shape[1]), dim=1, largest=False).values
            out.append(best.sort(dim=1).values)
        return torch.cat(out)

    def _faiss_kneighbors(self, queries: torch.Tensor) -> torch.Tensor:
        """The same exact search with faiss's flat L2 index (squared distances), built once per bank."""
        import faiss

        if getattr(self, "_index_of", None) is not self.bank:
            self._index = faiss.IndexFlatL2(self.bank.shape[1])
            self._index.add(self.bank.numpy())
            self._index_of = self.bank
        dist, _ = self._index.search(queries.contiguous().numpy(), self.k)
        return torch.from_numpy(dist).clamp_min_(0.0)

    def score(self, queries: torch.Tensor) -> torch.Tensor:
        d2 = self.kneighbors(queries)
        return d2.sum(1) if self.distance == "squared" else d2.sqrt().sum(1)
