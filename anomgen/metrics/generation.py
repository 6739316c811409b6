"""Quality of a generated set: FID, KID, density and coverage against real images; Inception Score and IC-LPIPS.

FITYMI stops training its score model early, when the FID of generated samples against the normal training images
reaches a target (about 40 at low resolution, about 200 at high resolution); it reports the density and coverage
(Naeem et al. 2020, k = 5) and the FID of the sets it generates. AnomalyDiffusion reports the Inception Score of its
generated anomalies and their IC-LPIPS (diversity around the training anomalies). Everything here works with a network
given as an ``nn.Module``; the metrics never build one themselves (encoders and metrics are sibling packages: neither
imports the other):

- a feature space, [0, 1] images (B × 3 × H × W) -> features (B × D), for FID / KID / density and coverage:
  :class:`anomgen.encoders.InceptionFeatures` (the standard FID features, from local torch-fidelity weights), or
  any other module, e.g. :class:`anomgen.encoders.RawPixels` for tiny images (8×8 digits, 28×28 silhouettes) or an
  :class:`anomgen.encoders.OpenCLIPImageEncoder`;
- a classifier, images -> class logits (B × C), for the Inception Score: ``InceptionFeatures(feature=
  "logits_unbiased")`` (the standard one) or any classifier;
- a distance, two image batches -> B distances, for IC-LPIPS: :class:`anomgen.encoders.LPIPSDistance`,
  torchmetrics' ``LearnedPerceptualImagePatchSimilarity``, or any stand-in.

In the configs, ``pretrained.fid_features``, ``pretrained.is_classifier`` and ``pretrained.lpips`` name them
(``pretrained=tiny``: small random stand-ins).

Plain functions take feature matrices (or images): :func:`feature_statistics`, :func:`frechet_distance`,
:func:`fid_from_features`, :func:`kid_from_features`, :func:`density_coverage`, :func:`inception_score_from_logits`,
:func:`ic_lpips`. :class:`FID`, :class:`KID` and :class:`InceptionScore` are torchmetrics metrics that take images (or
features) batch by batch and sync across DDP processes. :func:`generation_metrics` computes IS and IC-LPIPS of a
synthetic set folder against the generator's training anomalies.

Numerics. Statistics are float64. :func:`frechet_distance` computes the trace term
``tr((Σ1 Σ2)^½)`` as ``Σ √λ`` over the eigenvalues λ of the symmetric positive semi-definite matrix
``Σ1^½ Σ2 Σ1^½`` (which has the same eigenvalues as ``Σ1 Σ2``), with ``Σ1^½`` from a symmetric eigendecomposition and
tiny negative eigenvalues (round-off) clipped to 0. This needs no complex arithmetic and stays finite when a covariance
is singular (fewer samples than feature dimensions, constant pixels). ``method="sqrtm"`` gives the classical
formulation instead: ``scipy.linalg.sqrtm(Σ1 Σ2)``, retried with ``eps·I`` added to both covariances when the result is
not finite, and its real part kept when the imaginary part is round-off.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import Metric

from anomgen.errors import MetricError

__all__ = [
    "FID",
    "KID",
    "ClusterDiversity",
    "DensityCoverage",
    "InceptionScore",
    "density_coverage",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "generation_metrics",
    "ic_lpips",
    "inception_score_from_logits",
    "kid_from_features",
    "pair_distances",
]

# ---------------------------------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------------------------------

FRECHET_METHODS = ("eigh", "sqrtm")


def _float64(x: Any, name: str) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    if t.is_complex():
        raise TypeError(f"{name}: expected real numbers, got dtype {t.dtype}")
    return t.detach().to(torch.float64)


def _features_2d(x: Any, name: str) -> Tensor:
    t = _float64(x, name)
    if t.dim() != 2:
        raise ValueError(f"{name}: expected a feature matrix N × D, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise MetricError(f"{name}: features contain NaN or inf")
    return t


def _sym(m: Tensor) -> Tensor:
    return (m + m.transpose(-1, -2)) / 2


def feature_statistics(features: Any) -> tuple[Tensor, Tensor]:
    """Mean (D) and unbiased covariance (D × D, divided by N − 1) of an N × D feature matrix, both float64."""
    feats = _features_2d(features, "features")
    n = feats.shape[0]
    if n < 2:
        raise MetricError(f"feature statistics need at least 2 samples, got {n}")
    mu = feats.mean(dim=0)
    centred = feats - mu
    sigma = _sym(centred.T @ centred / (n - 1))
    return mu, sigma


def _statistics_from_sums(total: Tensor, outer: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Mean and unbiased covariance from Σx, Σxxᵀ and N (what the streaming metrics accumulate)."""
    mu = total / n
    sigma = (outer - n * torch.outer(mu, mu)) / (n - 1)
    return mu, _sym(sigma)


def _trace_sqrt_product_eigh(sigma1: Tensor, sigma2: Tensor) -> float:
    w1, v1 = torch.linalg.eigh(sigma1)
    root1 = (v1 * w1.clamp(min=0).sqrt()) @ v1.T
    w = torch.linalg.eigvalsh(_sym(root1 @ sigma2 @ root1))
    return float(w.clamp(min=0).sqrt().sum())


def _trace_sqrt_product_sqrtm(sigma1: Tensor, sigma2: Tensor, eps: float) -> float:
    from scipy import linalg

    s1, s2 = sigma1.cpu().numpy(), sigma2.cpu().numpy()
    with np.errstate(all="ignore"):
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if not np.isfinite(covmean).all():
        raise MetricError("frechet_distance: the matrix square root of Σ1·Σ2 is not finite even with the eps offset; "
                          "use method='eigh'")
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        if imag > 1e-3:
            raise MetricError(f"frechet_distance: sqrtm(Σ1·Σ2) has an imaginary part of {imag:.3g} on its diagonal "
                              "(not round-off); use method='eigh'")
        covmean = covmean.real
    return float(np.trace(covmean))


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, method: str = "eigh", eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2): ‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1 Σ2)^½).

    Inputs are tensors or arrays (converted to float64). ``method="eigh"`` (default) is the symmetric eigenvalue
    formulation, ``"sqrtm"`` the scipy matrix square root with the ``eps``-offset retry (see the module docstring).
    The result is clipped at 0 (round-off can make the distance of a set to itself slightly negative).
    """
    if method not in FRECHET_METHODS:
        raise ValueError(f"frechet_distance: method must be one of {FRECHET_METHODS}, got {method!r}")
    mu1, mu2 = _float64(mu1, "mu1"), _float64(mu2, "mu2")
    sigma1, sigma2 = _float64(sigma1, "sigma1"), _float64(sigma2, "sigma2")
    d = mu1.shape[-1] if mu1.dim() else 0
    if mu1.dim() != 1 or mu2.shape != mu1.shape:
        raise ValueError(f"frechet_distance: means must be vectors of the same length, got {tuple(mu1.shape)} and "
                         f"{tuple(mu2.shape)}")
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"frechet_distance: covariances must be {d} × {d}, got {tuple(sigma1.shape)} and "
                         f"{tuple(sigma2.shape)}")
    for name, t in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not torch.isfinite(t).all():
            raise MetricError(f"frechet_distance: {name} contains NaN or inf")
    sigma2 = sigma2.to(sigma1.device)
    sigma1, sigma2 = _sym(sigma1), _sym(sigma2)
    diff = float((mu1 - mu2.to(mu1.device)).square().sum())
    if method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
    else:
        tr_covmean = _trace_sqrt_product_sqrtm(sigma1, sigma2, eps)
    value = diff + float(torch.trace(sigma1)) + float(torch.trace(sigma2)) - 2.0 * tr_covmean
    return max(value, 0.0)


def fid_from_features(real_features: Any, fake_features: Any, method: str = "eigh") -> float:
    """FID between two feature matrices (N × D and M × D, N, M ≥ 2)."""
    real, fake = _features_2d(real_features, "real_features"), _features_2d(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"fid_from_features: real features have {real.shape[1]} dimensions, fake {fake.shape[1]}")
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake), method=method)


# ---------------------------------------------------------------------------------------------------------------------
# KID
# ---------------------------------------------------------------------------------------------------------------------


def _poly_kernel(a: Tensor, b: Tensor, degree: int, gamma: float, coef0: float) -> Tensor:
    return (gamma * (a @ b.T) + coef0) ** degree


def _unbiased_mmd2(real: Tensor, fake: Tensor, degree: int, gamma: float, coef0: float) -> Tensor:
    m = real.shape[0]
    k_rr = _poly_kernel(real, real, degree, gamma, coef0)
    k_ff = _poly_kernel(fake, fake, degree, gamma, coef0)
    k_rf = _poly_kernel(real, fake, degree, gamma, coef0)
    within = (k_rr.sum() - k_rr.diagonal().sum() + k_ff.sum() - k_ff.diagonal().sum()) / (m * (m - 1))
    return within - 2 * k_rf.sum() / (m * m)


def kid_from_features(
    real_features: Any,
    fake_features: Any,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef0: float = 1.0,
    seed: int | None = 0,
) -> tuple[float, float]:
    """Kernel Inception Distance: mean and (population) std over ``subsets`` random subsets of the unbiased MMD² with
    the polynomial kernel k(x, y) = (γ xᵀy + coef0)^degree, γ = 1/D by default.

    Each subset draws ``m = min(subset_size, N, M)`` real and m fake samples without replacement; the subsets are
    seeded by ``seed`` (``None``: torch's global generator), so a given feature set always gives the same value.
    """
    real, fake = _features_2d(real_features, "real_features"), _features_2d(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"kid_from_features: real features have {real.shape[1]} dimensions, fake {fake.shape[1]}")
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"kid_from_features: need subsets >= 1 and subset_size >= 2, got {subsets}, {subset_size}")
    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2:
        raise MetricError(f"KID needs at least 2 real and 2 fake samples, got {real.shape[0]} and {fake.shape[0]}")
    gamma = 1.0 / real.shape[1] if gamma is None else float(gamma)
    generator = None if seed is None else torch.Generator().manual_seed(int(seed))
    values = []
    for _ in range(subsets):
        r = real[torch.randperm(real.shape[0], generator=generator)[:m].to(real.device)]
        f = fake[torch.randperm(fake.shape[0], generator=generator)[:m].to(fake.device)]
        values.append(_unbiased_mmd2(r, f, degree, gamma, coef0))
    scores = torch.stack(values)
    return float(scores.mean()), float(scores.std(unbiased=False))


# ---------------------------------------------------------------------------------------------------------------------
# Density and coverage
# ---------------------------------------------------------------------------------------------------------------------


class DensityCoverage(NamedTuple):
    density: float
    coverage: float


def _pairwise(a: Tensor, b: Tensor) -> Tensor:
    return torch.cdist(a, b).clamp_(min=0)


def _knn_radii(real: Tensor, k: int, chunk_size: int) -> Tensor:
    """Distance of each real sample to its k-th nearest other real sample."""
    n = real.shape[0]
    radii = torch.empty(n, dtype=real.dtype, device=real.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        d = _pairwise(real[start:stop], real)
        rows = torch.arange(stop - start, device=real.device)
        d[rows, rows + start] = float("inf")  # a sample is not its own neighbour
        radii[start:stop] = d.kthvalue(k, dim=1).values
    return radii


def density_coverage(real_features: Any, fake_features: Any, k: int = 5, chunk_size: int = 1024) -> DensityCoverage:
    """Density and coverage of a fake set with respect to a real set (Naeem et al. 2020).

    With r_i the distance of real sample i to its k-th nearest other real sample and B(x, r) the open ball:

    - density  = 1/(k M) · Σ_j Σ_i 1[fake_j ∈ B(real_i, r_i)]  (≈ 1 when fakes follow the real distribution; above 1
      when they crowd dense real regions);
    - coverage = 1/N · Σ_i 1[∃ j: fake_j ∈ B(real_i, r_i)]  (in [0, 1]).

    Distances are exact (Euclidean, float64) and computed ``chunk_size`` rows at a time, so memory stays
    O(chunk_size · max(N, M)). Membership is strict (d < r_i), as in the authors' reference code: a fake set equal to
    the real set (with no ties among distances) has density 1 and coverage 1.
    """
    real, fake = _features_2d(real_features, "real_features"), _features_2d(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"density_coverage: real features have {real.shape[1]} dimensions, fake {fake.shape[1]}")
    n, m = real.shape[0], fake.shape[0]
    if k < 1:
        raise ValueError(f"density_coverage: k must be >= 1, got {k}")
    if n <= k:
        raise MetricError(f"density_coverage: needs more than k = {k} real samples, got {n}")
    if m < 1:
        raise MetricError("density_coverage: no fake samples")
    if chunk_size < 1:
        raise ValueError(f"density_coverage: chunk_size must be >= 1, got {chunk_size}")
    fake = fake.to(real.device)
    radii = _knn_radii(real, k, chunk_size)
    inside = 0
    nearest_fake = torch.full((n,), float("inf"), dtype=real.dtype, device=real.device)
    for start in range(0, m, chunk_size):
        d = _pairwise(fake[start : start + chunk_size], real)  # chunk × N
        inside += int((d < radii).sum())
        nearest_fake = torch.minimum(nearest_fake, d.min(dim=0).values)
    density = inside / (k * m)
    coverage = float((nearest_fake < radii).double().mean())
    return DensityCoverage(density=density, coverage=coverage)


# ---------------------------------------------------------------------------------------------------------------------
# Streaming metrics
# ---------------------------------------------------------------------------------------------------------------------


def _num_features_of(extractor: nn.Module, input_size: tuple[int, ...] | None) -> int | None:
    num = getattr(extractor, "num_features", None)
    if isinstance(num, Tensor):
        num = int(num.item())
    if isinstance(num, int):
        return num
    if input_size is not None:
        param = next(extractor.parameters(), None)
        dummy = torch.rand(1, *input_size, device=param.device if param is not None else None)
        with torch.no_grad():
            out = extractor(dummy)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return int(out.reshape(1, -1).shape[1])
    return None


class _ModuleMetric(Metric):
    """A metric that runs a given network on images: the feature extractor of :class:`FID` and :class:`KID`, the
    classifier of :class:`InceptionScore`.

    The network is *not* a registered sub-module: it stays out of the metric's (and so the LightningModule's)
    ``state_dict``, ``parameters()`` and ``train()``/``eval()`` switches, and is not wrapped by DDP. It still follows
    ``.to(device)`` / ``.cuda()`` of the metric or of the module that holds it, and is kept in evaluation mode.
    """

    is_differentiable = False
    full_state_update = False
    _module_name = "feature_extractor"
    _module_hint = ""

    def __init__(self, module: nn.Module, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if module is None:
            raise TypeError(f"{type(self).__name__} needs a {self._module_name}: {self._module_hint}")
        if not isinstance(module, nn.Module):
            raise TypeError(f"{self._module_name} must be an nn.Module, got {type(module).__name__}")
        module.eval()
        self._extractor_box = (module,)

    def _apply(self, fn, *args, **kwargs):
        this = super()._apply(fn, *args, **kwargs)
        box = self.__dict__.get("_extractor_box")
        if box:
            box[0]._apply(fn)
        return this

    @torch.no_grad()
    def extract(self, images: Tensor) -> Tensor:
        """The network's outputs (float64, B × D) for [0, 1] images (uint8 images are divided by 255 first)."""
        if images.dtype == torch.uint8:
            images = images.float() / 255
        feats = self._extractor_box[0](images)
        if isinstance(feats, (tuple, list)):
            feats = feats[0]
        return feats.reshape(images.shape[0], -1).double()

    def forward(self, *args: Any, **kwargs: Any) -> None:
        """Same as :meth:`update` (a per-batch value of a set-level metric would mean nothing); returns None."""
        self.update(*args, **kwargs)


class _FeatureMetric(_ModuleMetric):
    """Shared by :class:`FID` and :class:`KID`: the feature extractor, update(images | features, real), and keeping
    the real side across resets."""

    _real_states: tuple[str, ...] = ()
    _module_hint = (
        "anomgen.encoders.InceptionFeatures() for the standard Inception-v3 feature space (local torch-fidelity "
        "weights), anomgen.encoders.RawPixels() for small images (8×8 digits, 28×28 silhouettes), or any nn.Module "
        "mapping [0, 1] images B×3×H×W to features B×D")

    def __init__(self, feature_extractor: nn.Module, reset_real_features: bool, **kwargs: Any) -> None:
        if not isinstance(reset_real_features, bool):
            raise TypeError(f"reset_real_features must be a bool, got {reset_real_features!r}")
        super().__init__(feature_extractor, **kwargs)
        self.reset_real_features = reset_real_features

    @property
    def feature_extractor(self) -> nn.Module:
        return self._extractor_box[0]

    def _batch_features(self, images: Tensor | None, features: Tensor | None) -> Tensor:
        if (images is None) == (features is None):
            raise ValueError(f"{type(self).__name__}.update: give exactly one of images and features=")
        if images is not None:
            return self.extract(images)
        feats = _float64(features, "features").to(self.device)
        if feats.dim() == 1:
            feats = feats.unsqueeze(0)
        if feats.dim() != 2:
            raise ValueError(f"{type(self).__name__}.update: features must be B × D, got {tuple(feats.shape)}")
        return feats

    def reset(self) -> None:
        """Clear the fake side; the real side too only when ``reset_real_features=True`` (see :meth:`reset_real`)."""
        if self.reset_real_features:
            super().reset()
            return
        kept = {name: getattr(self, name) for name in self._real_states}
        kept = {name: (v if isinstance(v, Tensor) else list(v)) for name, v in kept.items()}
        super().reset()
        for name, value in kept.items():
            setattr(self, name, value)

    def reset_real(self) -> None:
        """Clear the real side (and only it)."""
        for name in self._real_states:
            default = self._defaults[name]
            if isinstance(default, Tensor):
                setattr(self, name, default.detach().clone().to(self.device))
            else:
                setattr(self, name, [])
        self._computed = None

    def set_real_features(self, features: Tensor) -> None:
        """Replace the real side by precomputed features (N × D), e.g. of the normal training images."""
        self.reset_real()
        self.update(None, real=True, features=features)


class FID(_FeatureMetric):
    """Fréchet distance between real and generated images in the feature space of ``feature_extractor``.

    ``update(images, real)`` takes [0, 1] images B×3×H×W (``update(None, real, features=F)`` takes features B × D);
    ``compute()`` returns the FID (a float32 scalar tensor). The state is Σx, Σxxᵀ (float64) and N for each side,
    summed across DDP processes (O(D²) memory whatever the number of images); ``merge_state`` adds two metrics.
    Ranks that each hold the *same* real images give the same mean and, up to the N−1 normalisation, the same
    covariance after the sum, so either sharded or replicated real features are fine.

    ``feature_extractor`` is required: :class:`anomgen.encoders.InceptionFeatures` for the standard FID (2048 pool
    features, from local weights only), ``anomgen.encoders.RawPixels()`` for small images, or any other feature
    module.

    With ``reset_real_features=False`` (default) the real statistics survive :meth:`reset`: compute them once from the
    normal training images (``update(images, real=True)`` batch by batch, or :meth:`set_real_features`), then per
    evaluation ``reset()``, add the generated samples with ``real=False`` and ``compute()``.

    The feature dimension D is ``num_features``, else the extractor's ``num_features`` attribute, else inferred from a
    dummy batch of ``input_size`` (C, H, W), else fixed at the first update. In that last case, with DDP, every rank
    must update both sides before ``compute()``.
    """

    higher_is_better = False
    plot_lower_bound = 0.0
    _real_states = ("real_features_sum", "real_features_outer_sum", "real_num_samples")

    def __init__(
        self,
        feature_extractor: nn.Module,
        reset_real_features: bool = False,
        num_features: int | None = None,
        input_size: tuple[int, int, int] | None = None,
        method: str = "eigh",
        **kwargs: Any,
    ) -> None:
        super().__init__(feature_extractor, reset_real_features, **kwargs)
        if method not in FRECHET_METHODS:
            raise ValueError(f"FID: method must be one of {FRECHET_METHODS}, got {method!r}")
        self.method = method
        if num_features is None:
            num_features = _num_features_of(self.feature_extractor, input_size)
        self.num_features = num_features
        d = num_features or 0
        for side in ("real", "fake"):
            self.add_state(f"{side}_features_sum", torch.zeros(d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_features_outer_sum", torch.zeros(d, d, dtype=torch.float64), dist_reduce_fx="sum")
            self.add_state(f"{side}_num_samples", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def _allocate(self, side: str, d: int) -> None:
        if self.num_features is None:
            self.num_features = d
        elif d != self.num_features:
            raise MetricError(f"FID: features have {d} dimensions, the metric holds {self.num_features}")
        if getattr(self, f"{side}_features_sum").numel() != d:
            device = self.device
            setattr(self, f"{side}_features_sum", torch.zeros(d, dtype=torch.float64, device=device))
            setattr(self, f"{side}_features_outer_sum", torch.zeros(d, d, dtype=torch.float64, device=device))

    def update(self, images: Tensor | None, real: bool, features: Tensor | None = None) -> None:
        feats = self._batch_features(images, features)
        side = "real" if real else "fake"
        self._allocate(side, feats.shape[1])
        total = getattr(self, f"{side}_features_sum")
        setattr(self, f"{side}_features_sum", total + feats.sum(dim=0).to(total.device))
        outer = getattr(self, f"{side}_features_outer_sum")
        setattr(self, f"{side}_features_outer_sum", outer + (feats.T @ feats).to(outer.device))
        count = getattr(self, f"{side}_num_samples")
        setattr(self, f"{side}_num_samples", count + feats.shape[0])

    def _reduce_states(self, incoming_state: dict[str, Any]) -> None:
        # a side that was never updated still has its empty default: give it the other's shape
        incoming = dict(incoming_state)
        for name in self._defaults:
            local, other = getattr(self, name), incoming[name]
            if isinstance(local, Tensor) and local.shape != other.shape:
                if local.numel() == 0:
                    setattr(self, name, torch.zeros_like(other, device=local.device))
                elif other.numel() == 0:
                    incoming[name] = torch.zeros_like(local)
        if self.num_features is None and incoming["real_features_sum"].numel():
            self.num_features = int(incoming["real_features_sum"].numel())
        if self.num_features is None and incoming["fake_features_sum"].numel():
            self.num_features = int(incoming["fake_features_sum"].numel())
        super()._reduce_states(incoming)

    def _statistics(self, side: str) -> tuple[Tensor, Tensor]:
        n = int(getattr(self, f"{side}_num_samples"))
        if n < 2:
            raise MetricError(
                f"FID needs at least 2 {side} samples, has {n}"
                + ("" if side == "fake" else " (the real side is kept across reset(); give it the normal training "
                   "images once with update(images, real=True) or set_real_features)")
            )
        return _statistics_from_sums(getattr(self, f"{side}_features_sum"),
                                     getattr(self, f"{side}_features_outer_sum"), n)

    def real_statistics(self) -> tuple[Tensor, Tensor]:
        """Mean and covariance (float64) of the real features seen so far on this process."""
        return self._statistics("real")

    def fake_statistics(self) -> tuple[Tensor, Tensor]:
        """Mean and covariance (float64) of the fake features seen so far on this process."""
        return self._statistics("fake")

    def compute(self) -> Tensor:
        value = frechet_distance(*self._statistics("real"), *self._statistics("fake"), method=self.method)
        return torch.tensor(value, dtype=torch.float32, device=self.device)


class KID(_FeatureMetric):
    """Kernel Inception Distance (unbiased MMD² with a cubic polynomial kernel, averaged over random subsets) between
    real and generated images; ``compute()`` returns ``(mean, std)`` as float32 scalar tensors.

    Same interface as :class:`FID` (``update(images, real)``, ``features=``, :meth:`set_real_features`,
    ``reset_real_features=False`` keeping the real side). The state is the
    feature matrices themselves (O(N·D) memory), gathered across DDP processes. Subsets are drawn with ``seed``, so
    every rank computes the same value. ``subset_size`` is capped at the smaller set's size.
    """

    higher_is_better = False
    _real_states = ("real_features",)

    def __init__(
        self,
        feature_extractor: nn.Module,
        reset_real_features: bool = False,
        subsets: int = 100,
        subset_size: int = 1000,
        degree: int = 3,
        gamma: float | None = None,
        coef0: float = 1.0,
        seed: int | None = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(feature_extractor, reset_real_features, **kwargs)
        if subsets < 1 or subset_size < 2:
            raise ValueError(f"KID: need subsets >= 1 and subset_size >= 2, got {subsets}, {subset_size}")
        self.subsets, self.subset_size, self.degree = subsets, subset_size, degree
        self.gamma, self.coef0, self.seed = gamma, coef0, seed
        self.add_state("real_features", [], dist_reduce_fx="cat")
        self.add_state("fake_features", [], dist_reduce_fx="cat")

    def update(self, images: Tensor | None, real: bool, features: Tensor | None = None) -> None:
        feats = self._batch_features(images, features)
        (self.real_features if real else self.fake_features).append(feats)

    @staticmethod
    def _cat(state: Tensor | list[Tensor]) -> Tensor | None:
        if isinstance(state, Tensor):
            return state
        return torch.cat(state) if state else None

    def compute(self) -> tuple[Tensor, Tensor]:
        real, fake = self._cat(self.real_features), self._cat(self.fake_features)
        if real is None or fake is None:
            raise MetricError(f"KID needs real and fake samples; has {0 if real is None else len(real)} real and "
                              f"{0 if fake is None else len(fake)} fake")
        mean, std = kid_from_features(real, fake, self.subsets, self.subset_size, self.degree, self.gamma,
                                      self.coef0, self.seed)
        return (torch.tensor(mean, dtype=torch.float32, device=self.device),
                torch.tensor(std, dtype=torch.float32, device=self.device))


# ---------------------------------------------------------------------------------------------------------------------
# Inception Score
# ---------------------------------------------------------------------------------------------------------------------


def inception_score_from_logits(logits: Any, splits: int = 10, seed: int | None = 0) -> tuple[float, float]:
    """Inception Score of an N × C matrix of class logits: mean and std over splits of
    ``exp(E_x KL(p(y|x) ‖ p(y)))``, with p(y|x) the softmax of a row and p(y) the mean of p(y|x) over the split.

    As torchmetrics' ``InceptionScore`` (and so equal to it on the same logits and permutation): the rows are shuffled
    first, then cut by ``torch.chunk(splits)`` (chunks of ⌈N / splits⌉ rows, so fewer than ``splits`` chunks when N
    is not a multiple), and the std is the unbiased one (N − 1) over the chunks; 0 with a single chunk. ``seed``
    fixes the shuffle (``None``: torch's global generator, torchmetrics' own behaviour). Computed in float64.
    """
    x = _features_2d(logits, "logits")
    n = x.shape[0]
    if int(splits) < 1:
        raise ValueError(f"inception_score: splits must be >= 1, got {splits}")
    if n < 2 * int(splits):
        raise MetricError(f"inception_score: {n} samples for {splits} splits; each split needs at least 2 samples "
                          "(lower splits)")
    generator = None if seed is None else torch.Generator().manual_seed(int(seed))
    x = x[torch.randperm(n, generator=generator).to(x.device)]
    prob, log_prob = x.softmax(dim=1), x.log_softmax(dim=1)
    scores = []
    for p, log_p in zip(prob.chunk(int(splits)), log_prob.chunk(int(splits))):
        marginal = p.mean(dim=0, keepdim=True)
        scores.append((p * (log_p - marginal.log())).sum(dim=1).mean().exp())
    values = torch.stack(scores)
    std = float(values.std()) if len(values) > 1 else 0.0
    return float(values.mean()), std


class InceptionScore(_ModuleMetric):
    """Inception Score of generated images under ``classifier`` (any module mapping [0, 1] images B×3×H×W to class
    logits B × C): ``update(images)`` (or ``update(None, logits=L)``), ``compute()`` -> ``(mean, std)`` float32
    scalar tensors, by :func:`inception_score_from_logits` (``splits``, ``seed``).

    The standard IS classifier is Inception-v3's logits, ``anomgen.encoders.InceptionFeatures(feature=
    "logits_unbiased")`` (local torch-fidelity weights only; ``pretrained.is_classifier`` in the configs). The state is
    the logits (O(N·C) memory), gathered across DDP processes; the seeded shuffle makes every rank compute the same
    value.
    """

    higher_is_better = True
    _module_name = "classifier"
    _module_hint = (
        "anomgen.encoders.InceptionFeatures(feature='logits_unbiased') for the standard Inception Score (local "
        "torch-fidelity weights), or any nn.Module mapping [0, 1] images B×3×H×W to class logits B×C")

    def __init__(self, classifier: nn.Module, splits: int = 10, seed: int | None = 0, **kwargs: Any) -> None:
        super().__init__(classifier, **kwargs)
        if int(splits) < 1:
            raise ValueError(f"InceptionScore: splits must be >= 1, got {splits}")
        self.splits, self.seed = int(splits), seed
        self.add_state("logits", [], dist_reduce_fx="cat")

    @property
    def classifier(self) -> nn.Module:
        return self._extractor_box[0]

    def update(self, images: Tensor | None, logits: Tensor | None = None) -> None:
        if (images is None) == (logits is None):
            raise ValueError("InceptionScore.update: give exactly one of images and logits=")
        out = self.extract(images) if images is not None else _float64(logits, "logits").to(self.device)
        if out.dim() != 2:
            raise ValueError(f"InceptionScore.update: logits must be B × C, got {tuple(out.shape)}")
        self.logits.append(out)

    def compute(self) -> tuple[Tensor, Tensor]:
        logits = self.logits if isinstance(self.logits, Tensor) else (torch.cat(self.logits) if self.logits else None)
        if logits is None:
            raise MetricError("InceptionScore has no samples")
        mean, std = inception_score_from_logits(logits, self.splits, self.seed)
        return (torch.tensor(mean, dtype=torch.float32, device=self.device),
                torch.tensor(std, dtype=torch.float32, device=self.device))


# ---------------------------------------------------------------------------------------------------------------------
# IC-LPIPS
# ---------------------------------------------------------------------------------------------------------------------


class ClusterDiversity(NamedTuple):
    """What :func:`ic_lpips` found: ``value`` (the mean over the clusters of two or more images), ``per_cluster``
    (NaN for a cluster of fewer than two), ``sizes`` (generated images per cluster, before any cap) and
    ``assignment`` (each generated image's nearest centre)."""

    value: float
    per_cluster: list[float]
    sizes: list[int]
    assignment: Tensor


def _module_device(module: Any) -> torch.device | None:
    param = next(iter(module.parameters()), None) if isinstance(module, nn.Module) else None
    return None if param is None else param.device


def _as_images(images: Any, name: str) -> Tensor:
    t = images if isinstance(images, Tensor) else torch.as_tensor(np.asarray(images))
    if t.dim() != 4 or t.shape[1] != 3:
        raise ValueError(f"{name}: expected images N × 3 × H × W, got shape {tuple(t.shape)}")
    return t


def _float_images(t: Tensor) -> Tensor:
    return t.float() / 255 if t.dtype == torch.uint8 else t.float()


def _call_distance(distance: Any, x: Tensor, y: Tensor) -> Tensor:
    """B distances of the pairs (x[i], y[i]) under ``distance``: a module ``(x, y) -> B`` values, or torchmetrics'
    ``LearnedPerceptualImagePatchSimilarity`` (its network is called on [0, 1] inputs, whatever its ``normalize``)."""
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
    except ImportError:  # pragma: no cover - torchmetrics' image extras need torchvision
        LearnedPerceptualImagePatchSimilarity = ()  # noqa: N806
    if LearnedPerceptualImagePatchSimilarity and isinstance(distance, LearnedPerceptualImagePatchSimilarity):
        out = distance.net(x, y, normalize=True)
    else:
        out = distance(x, y)
    out = out.reshape(-1) if isinstance(out, Tensor) else torch.as_tensor(out).reshape(-1)
    if out.numel() != x.shape[0]:
        raise ValueError(f"the distance gave {out.numel()} values for {x.shape[0]} pairs; it must map two B×3×H×W "
                         "batches to B distances")
    return out.detach().double().cpu()


@torch.no_grad()
def pair_distances(distance: Any, a: Any, b: Any, pairs: Tensor, batch_size: int = 32) -> Tensor:
    """Distances (float64, P) of the image pairs ``(a[i], b[j])`` for the rows ``(i, j)`` of ``pairs`` (P × 2),
    ``batch_size`` pairs per call of ``distance``. Images are [0, 1] floats or uint8 (divided by 255)."""
    a, b = _as_images(a, "a"), _as_images(b, "b")
    if a.shape[-2:] != b.shape[-2:]:
        raise ValueError(f"pair_distances: images of {tuple(a.shape[-2:])} and {tuple(b.shape[-2:])} pixels; resize "
                         "one set to the other's size first")
    if batch_size < 1:
        raise ValueError(f"pair_distances: batch_size must be >= 1, got {batch_size}")
    device = _module_device(distance)
    if isinstance(distance, nn.Module):
        distance.eval()
    out = []
    for start in range(0, len(pairs), batch_size):
        rows = pairs[start : start + batch_size]
        x, y = _float_images(a[rows[:, 0]]), _float_images(b[rows[:, 1]])
        if device is not None:
            x, y = x.to(device), y.to(device)
        out.append(_call_distance(distance, x, y))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def ic_lpips(generated: Any, centres: Any, distance: Any, max_per_cluster: int | None = 50, seed: int = 0,
             batch_size: int = 32) -> ClusterDiversity:
    """Intra-cluster LPIPS (Ojha et al. 2021; AnomalyDiffusion's diversity metric) of ``generated`` images
    (N × 3 × H × W) around the ``centres`` (the k training anomalies, k × 3 × H × W), under ``distance``.

    1. Each generated image joins the cluster of its nearest centre (smallest distance; ties: the first centre).
    2. Per cluster, the mean distance over every unordered pair of its generated images (the centre itself is not a
       member). A cluster of more than ``max_per_cluster`` images keeps that many, drawn by ``seed`` (Ojha et al.'s
       reference keeps 50 at random; ``None`` keeps all).
    3. The value is the mean over the clusters that hold at least two images (a cluster of 0 or 1 has no pair and is
       left out, as in the reference); none such is a :class:`MetricError`.

    ``distance`` maps two [0, 1] batches B×3×H×W to B distances: :class:`anomgen.encoders.LPIPSDistance`,
    torchmetrics' ``LearnedPerceptualImagePatchSimilarity``, or any stand-in.
    """
    gen, ctr = _as_images(generated, "generated"), _as_images(centres, "centres")
    n, k = gen.shape[0], ctr.shape[0]
    if k < 1:
        raise MetricError("ic_lpips: no training anomalies to cluster around")
    if n < 2:
        raise MetricError(f"ic_lpips: needs at least 2 generated images, got {n}")
    if max_per_cluster is not None and int(max_per_cluster) < 2:
        raise ValueError(f"ic_lpips: max_per_cluster must be >= 2 or None, got {max_per_cluster}")
    cross = torch.cartesian_prod(torch.arange(n), torch.arange(k))  # (i, c), row-major: row i * k + c
    to_centre = pair_distances(distance, gen, ctr, cross, batch_size).reshape(n, k)
    assignment = to_centre.argmin(dim=1)  # the first minimum on ties
    generator = torch.Generator().manual_seed(int(seed))
    per_cluster, sizes = [], []
    for c in range(k):
        members = torch.nonzero(assignment == c).flatten()
        sizes.append(int(members.numel()))
        if max_per_cluster is not None and members.numel() > int(max_per_cluster):
            keep = torch.randperm(members.numel(), generator=generator)[: int(max_per_cluster)]
            members = members[keep.sort().values]
        m = members.numel()
        if m < 2:
            per_cluster.append(float("nan"))
            continue
        i, j = torch.triu_indices(m, m, offset=1)
        pairs = torch.stack([members[i], members[j]], dim=1)
        per_cluster.append(float(pair_distances(distance, gen, gen, pairs, batch_size).mean()))
    valid = [v for v in per_cluster if not math.isnan(v)]
    if not valid:
        raise MetricError(f"ic_lpips: no cluster holds two generated images (sizes {sizes}); generate more images")
    return ClusterDiversity(float(np.mean(valid)), per_cluster, sizes, assignment)


# ---------------------------------------------------------------------------------------------------------------------
# A synthetic set against the training anomalies
# ---------------------------------------------------------------------------------------------------------------------


def _stack_records(dataset: Any, size: tuple[int, int] | None = None) -> tuple[Tensor, list[str]]:
    """Every record's image as uint8 N × 3 × H × W (resized to ``size`` when given) and its defect type."""
    from anomgen.pixels import resize

    images, types = [], []
    for i in range(len(dataset)):
        record = dataset[i]
        image = record["image"]
        if size is not None and tuple(image.shape[-2:]) != tuple(size):
            image = resize(image[None], tuple(size))[0]
        images.append((image.clamp(0, 1) * 255).round().to(torch.uint8))
        types.append(str(record.get("defect_type", "")))
    if not images:
        return torch.zeros(0, 3, *(size or (1, 1)), dtype=torch.uint8), []
    return torch.stack(images), types


@torch.no_grad()
def generation_metrics(
    set_dir: Any,
    train_anomalies: Any,
    classifier: nn.Module | None = None,
    distance: Any = None,
    splits: int = 10,
    per_defect_type: bool = True,
    max_per_cluster: int | None = 50,
    seed: int = 0,
    batch_size: int = 32,
    image_size: int | tuple[int, int] | None = None,
) -> dict[str, float]:
    """AnomalyDiffusion's generation metrics of a synthetic set: Inception Score and IC-LPIPS.

    - ``set_dir``: a finished synthetic set; its anomalous samples (label 1) are the generated images.
    - ``train_anomalies``: a dataset of records (``image``, ``defect_type``): the real anomalies the generator learnt
      from, e.g. the first part of :func:`anomgen.data.tasks.anomalydiffusion_split` of the category's test split.
      They are resized to the generated images' size.
    - ``classifier``: the IS network (class logits, see :class:`InceptionScore`); ``None`` leaves IS out.
    - ``distance``: the IC-LPIPS distance (see :func:`ic_lpips`); ``None`` leaves IC-LPIPS out.
    - ``per_defect_type``: cluster each defect type's generated images around that type's training anomalies only
      (the generator is conditioned on the type); ``ic_lpips`` is then the mean over the types, and
      ``ic_lpips/<type>`` each type's value. ``False``: one clustering of every image around every training anomaly.
    - ``image_size``: resize the generated images on reading (``None``: as stored).

    Returns plain floats: ``num_generated``, ``inception_score``, ``inception_score_std``, ``ic_lpips``,
    ``ic_lpips/<type>``.
    """
    from anomgen.data.synthetic import SyntheticSet

    if classifier is None and distance is None:
        raise ValueError("generation_metrics: give a classifier (Inception Score), a distance (IC-LPIPS), or both")
    generated = SyntheticSet(set_dir, image_size=image_size, labels=(1,))
    if len(generated) == 0:
        raise MetricError(f"generation_metrics: the synthetic set {generated.root} has no anomalous sample")
    gen_images, gen_types = _stack_records(generated)
    out: dict[str, float] = {"num_generated": float(len(generated))}
    if classifier is not None:
        metric = InceptionScore(classifier, splits=splits, seed=seed)
        device = _module_device(classifier)
        for start in range(0, len(gen_images), batch_size):
            batch = _float_images(gen_images[start : start + batch_size])
            metric.update(batch if device is None else batch.to(device))
        mean, std = metric.compute()
        out["inception_score"], out["inception_score_std"] = float(mean), float(std)
    if distance is not None:
        centres, centre_types = _stack_records(train_anomalies, tuple(gen_images.shape[-2:]))
        if len(centres) == 0:
            raise MetricError("generation_metrics: no training anomalies to cluster around")
        kwargs = {"max_per_cluster": max_per_cluster, "seed": seed, "batch_size": batch_size}
        if not per_defect_type:
            out["ic_lpips"] = ic_lpips(gen_images, centres, distance, **kwargs).value
            return out
        values = []
        for defect in dict.fromkeys(gen_types):
            own = [i for i, t in enumerate(centre_types) if t == defect]
            if not own:
                raise MetricError(f"generation_metrics: generated defect type {defect!r} has no training anomaly of "
                                  f"that type (training types: {sorted(set(centre_types))})")
            idx = torch.tensor([i for i, t in enumerate(gen_types) if t == defect])
            try:
                value = ic_lpips(gen_images[idx], centres[torch.tensor(own)], distance, **kwargs).value
            except MetricError as err:
                raise MetricError(f"defect type {defect!r}: {err}") from None
            out[f"ic_lpips/{defect}"] = value
            values.append(value)
        out["ic_lpips"] = float(np.mean(values))
    return out
