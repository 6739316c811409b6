"""PCA of a feature bank, a post-transform of a detector's features (a model-selection candidate's
``reducer="pca:<d>"``)."""

from __future__ import annotations

import torch


class PCAReducer:
    """PCA fitted on a feature bank: ``fit(bank)`` then ``transform(features)`` -> N × ``n_components_``.

    The bank's mean is removed and the features are projected on its top right singular vectors (computed in
    float64), each signed so that its largest-magnitude loading is positive. ``n_components`` is capped at
    ``min(N, D)`` of the bank (``n_components_`` holds what was used).
    """

    def __init__(self, n_components: int) -> None:
        if n_components < 1:
            raise ValueError(f"PCAReducer: n_components must be >= 1, got {n_components}")
        self.n_components = int(n_components)
        self.mean_: torch.Tensor | None = None
        self.components_: torch.Tensor | None = None

    @property
    def n_components_(self) -> int:
        if self.components_ is None:
            raise RuntimeError("PCAReducer.fit(bank) must be called first")
        return int(self.components_.shape[0])

    def fit(self, bank: torch.Tensor) -> PCAReducer:
        bank = torch.as_tensor(bank).detach().cpu().double()
        if bank.dim() != 2 or len(bank) < 2:
            raise ValueError(f"PCAReducer: the bank must be N × D with N >= 2, got shape {tuple(bank.shape)}")
        self.mean_ = bank.mean(0)
        _, _, vh = torch.linalg.svd(bank - self.mean_, full_matrices=False)
        vh = vh[: min(self.n_components, *bank.shape)]
        signs = torch.sign(vh.gather(1, vh.abs().argmax(1, keepdim=True)))
        self.components_ = vh * signs
        return self

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        if self.components_ is None:
            raise RuntimeError("PCAReducer.fit(bank) must be called before transform")
        features = torch.as_tensor(features).detach().cpu().double()
        if features.dim() != 2 or features.shape[1] != self.components_.shape[1]:
            raise ValueError(f"PCAReducer: features must be M × {self.components_.shape[1]}, got "
                             f"{tuple(features.shape)}")
        return ((features - self.mean_) @ self.components_.T).float()

    def fit_transform(self, bank: torch.Tensor) -> torch.Tensor:
        return self.fit(bank).transform(bank)


__all__ = ["PCAReducer"]
