"""Generation-quality metrics: Fréchet distance, FID / KID metrics, density and coverage."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from anomgen.encoders import RawPixels
from anomgen.errors import MetricError
from anomgen.metrics import (
    FID,
    KID,
    density_coverage,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    kid_from_features,
)


class LinearFeatures(nn.Module):
    """A fixed random projection of 3×8×8 images to 12 features (a stand-in for a pretrained network)."""

    num_features = 12

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.proj = nn.Linear(3 * 8 * 8, self.num_features)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(self.num_features, 3 * 8 * 8, generator=gen) / 8)
            self.proj.bias.copy_(torch.randn(self.num_features, generator=gen))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images.flatten(1))


def _images(n: int, seed: int, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, 3, 8, 8, generator=gen)


def _spd(d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


# -- Fréchet distance -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["eigh", "sqrtm"])
def test_frechet_distance_matches_closed_form_for_diagonal_gaussians(method):
    gen = torch.Generator().manual_seed(0)
    mu1, mu2 = (torch.randn(10, generator=gen, dtype=torch.float64) for _ in range(2))
    s1 = torch.rand(10, generator=gen, dtype=torch.float64) + 0.1
    s2 = torch.rand(10, generator=gen, dtype=torch.float64) * 3 + 0.01
    expected = float((mu1 - mu2).square().sum() + (s1 + s2 - 2 * (s1 * s2).sqrt()).sum())
    got = frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2), method=method)
    assert got == pytest.approx(expected, rel=1e-9)
    # numpy arrays work too
    got_np = frechet_distance(mu1.numpy(), np.diag(s1.numpy()), mu2.numpy(), np.diag(s2.numpy()), method=method)
    assert got_np == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_methods_agree_on_full_and_singular_covariances():
    mu1, mu2 = torch.zeros(8, dtype=torch.float64), torch.full((8,), 0.3, dtype=torch.float64)
    s1, s2 = _spd(8, 1), _spd(8, 2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu1, s1, mu2, s2, method="sqrtm"),
                                                               rel=1e-8)
    # fewer samples than dimensions: both covariances are singular
    gen = torch.Generator().manual_seed(4)
    a, b = torch.randn(10, 30, generator=gen), torch.randn(12, 30, generator=gen) + 0.2
    eigh, sqrtm = fid_from_features(a, b), fid_from_features(a, b, method="sqrtm")
    assert math.isfinite(eigh) and eigh > 0
    assert eigh == pytest.approx(sqrtm, rel=1e-4)


def test_frechet_distance_checks_shapes_and_values():
    mu, s = torch.zeros(3), torch.eye(3)
    with pytest.raises(ValueError, match="3 × 3"):
        frechet_distance(mu, s, mu, torch.eye(4))
    with pytest.raises(ValueError, match="method"):
        frechet_distance(mu, s, mu, s, method="svd")
    with pytest.raises(MetricError, match="NaN"):
        frechet_distance(mu, s, mu + float("nan"), s)


def test_feature_statistics_are_float64_mean_and_unbiased_covariance():
    feats = torch.randn(40, 5, generator=torch.Generator().manual_seed(5))
    mu, sigma = feature_statistics(feats)
    assert mu.dtype == sigma.dtype == torch.float64
    np.testing.assert_allclose(mu.numpy(), feats.double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(feats.double().numpy(), rowvar=False), rtol=1e-10)
    with pytest.raises(MetricError, match="at least 2"):
        feature_statistics(feats[:1])


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    feats = torch.randn(300, 6, generator=torch.Generator().manual_seed(6))
    assert fid_from_features(feats, feats) == pytest.approx(0.0, abs=1e-8)
    # a pure mean shift by c in every dimension: FID = D c² exactly
    for c in (0.1, 0.5, 2.0):
        assert fid_from_features(feats, feats + c) == pytest.approx(6 * c * c, rel=1e-6)
    # through the metric and raw pixels: image shifts of growing size give growing FID
    images = _images(64, 7, hi=0.7)
    values = []
    for shift in (0.0, 0.05, 0.1, 0.3):
        fid = FID(RawPixels(), num_features=64)
        fid.update(images, real=True)
        fid.update(images + shift, real=False)
        values.append(float(fid.compute()))
    assert values[0] == pytest.approx(0.0, abs=1e-4)
    assert values == sorted(values) and values[-1] > values[1] > 0


# -- the FID metric ---------------------------------------------------------------------------------------------------


def test_fid_metric_matches_torchmetrics_with_the_same_feature_module():
    from torchmetrics.image.fid import FrechetInceptionDistance

    extractor = LinearFeatures()
    real, fake = _images(50, 8), _images(40, 9, lo=0.1)
    ours = FID(extractor)
    theirs = FrechetInceptionDistance(feature=extractor, normalize=True)
    for batch in real.split(16):
        ours.update(batch, real=True)
        theirs.update(batch, real=True)
    for batch in fake.split(16):
        ours.update(batch, real=False)
        theirs.update(batch, real=False)
    expected = float(theirs.compute())
    assert expected > 0.1
    assert float(ours.compute()) == pytest.approx(expected, rel=1e-3)
    with torch.no_grad():
        assert float(ours.compute()) == pytest.approx(fid_from_features(extractor(real), extractor(fake)), rel=1e-6)


def test_fid_keeps_real_statistics_across_reset():
    extractor = LinearFeatures()
    real, fake1, fake2 = _images(30, 10), _images(20, 11, lo=0.2), _images(20, 12, hi=0.8)
    fid = FID(extractor)
    assert fid.reset_real_features is False
    fid.update(real, real=True)
    fid.update(fake1, real=False)
    first = float(fid.compute())
    fid.reset()
    assert int(fid.real_num_samples) == 30 and int(fid.fake_num_samples) == 0
    with pytest.raises(MetricError, match="at least 2 fake"), pytest.warns(UserWarning, match="before the ``update``"):
        fid.compute()
    fid.update(fake2, real=False)
    with torch.no_grad():
        expected = fid_from_features(extractor(real), extractor(fake2))
    assert float(fid.compute()) == pytest.approx(expected, rel=1e-6)
    assert first != pytest.approx(expected, rel=1e-3)
    # reset_real_features=True clears both sides
    both = FID(extractor, reset_real_features=True)
    both.update(real, real=True)
    both.reset()
    assert int(both.real_num_samples) == 0
    # reset_real() clears only the real side
    fid.reset_real()
    assert int(fid.real_num_samples) == 0 and int(fid.fake_num_samples) == 20
    with pytest.raises(MetricError, match="at least 2 real"):
        fid.compute()


def test_fid_set_real_features_and_feature_updates():
    extractor = LinearFeatures()
    real, fake = _images(30, 13), _images(25, 14, lo=0.1)
    with torch.no_grad():
        real_f, fake_f = extractor(real), extractor(fake)
    fid = FID(extractor)
    fid.update(fake, real=False)
    fid.set_real_features(real_f[:5])  # replaced below: set_ replaces, it does not add
    fid.set_real_features(real_f)
    assert int(fid.real_num_samples) == 30
    assert float(fid.compute()) == pytest.approx(fid_from_features(real_f, fake_f), rel=1e-6)
    fid.reset()
    fid.update(None, real=False, features=fake_f[:10])  # the cached value must not be returned again
    assert float(fid.compute()) == pytest.approx(fid_from_features(real_f, fake_f[:10]), rel=1e-6)
    mu, sigma = fid.real_statistics()
    ref_mu, ref_sigma = feature_statistics(real_f)
    torch.testing.assert_close(mu, ref_mu)
    torch.testing.assert_close(sigma, ref_sigma)
    with pytest.raises(ValueError, match="exactly one"):
        fid.update(real, real=True, features=real_f)
    with pytest.raises(MetricError, match="dimensions"):
        fid.update(None, real=False, features=torch.randn(3, 5))


def test_fid_merged_halves_equal_one_metric_on_all():
    """What a DDP sync does: the sum states of two processes are added."""
    extractor = LinearFeatures()
    real, fake = _images(36, 15), _images(28, 16, lo=0.15)
    whole = FID(extractor)
    whole.update(real, real=True)
    whole.update(fake, real=False)
    halves = [FID(extractor), FID(extractor)]
    halves[0].update(real[:20], real=True)
    halves[1].update(real[20:], real=True)
    halves[0].update(fake[:9], real=False)
    halves[1].update(fake[9:], real=False)
    # manual addition of the states, as dist_reduce_fx="sum" does
    manual = FID(extractor)
    for name in manual._defaults:
        setattr(manual, name, getattr(halves[0], name) + getattr(halves[1], name))
    manual._update_count = 1  # states were set by hand, not by update()
    halves[0].merge_state(halves[1])
    expected = float(whole.compute())
    assert float(halves[0].compute()) == pytest.approx(expected, rel=1e-9)
    assert float(manual.compute()) == pytest.approx(expected, rel=1e-9)
    for name in ("real_features_sum", "real_features_outer_sum", "fake_features_outer_sum"):
        assert manual._reductions[name] is not None  # every state is a reduced (summed) tensor
        assert getattr(manual, name).dtype == torch.float64


def _ddp_worker(rank: int, port: int, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        real, fake = _images(36, 15), _images(28, 16, lo=0.15)
        fid = FID(LinearFeatures())
        # uneven shards, several batches
        for batch in (real[:20] if rank == 0 else real[20:]).split(7):
            fid.update(batch, real=True)
        fid.update(fake[:9] if rank == 0 else fake[9:], real=False)
        value = float(fid.compute())
        fid.reset()  # the synced real side must not leak into the local state, the fake side is cleared
        torch.save({"fid": value, "real_n": int(fid.real_num_samples), "fake_n": int(fid.fake_num_samples)},
                   f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # about 10 s: two processes that import torchmetrics
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_fid_two_gloo_processes_equal_one_process_on_all(tmp_path, free_port):
    out_path = str(tmp_path / "fid")
    mp.spawn(_ddp_worker, args=(free_port, out_path), nprocs=2, join=True)
    whole = FID(LinearFeatures())
    whole.update(_images(36, 15), real=True)
    whole.update(_images(28, 16, lo=0.15), real=False)
    expected = float(whole.compute())
    for rank, real_n in ((0, 20), (1, 16)):
        got = torch.load(f"{out_path}.{rank}")
        assert got["fid"] == pytest.approx(expected, rel=1e-5)
        assert got["real_n"] == real_n and got["fake_n"] == 0


def test_fid_infers_the_feature_dimension_lazily_and_merges_empty_sides():
    images = _images(20, 17)
    fid = FID(RawPixels())  # RawPixels has no num_features attribute: fixed at the first update
    assert fid.num_features is None
    fid.update(images, real=True)
    assert fid.num_features == 64 and fid.real_features_outer_sum.shape == (64, 64)
    other = FID(RawPixels())
    other.update(images * 0.9, real=False)
    fid.merge_state(other)  # one side empty on each metric
    assert float(fid.compute()) > 0
    fid.reset()
    assert fid.fake_features_sum.numel() == 0 and fid.real_features_sum.numel() == 64
    fid.update(images, real=False)
    assert float(fid.compute()) == pytest.approx(0.0, abs=1e-4)
    # or from a dummy batch
    assert FID(RawPixels(), input_size=(3, 5, 5)).num_features == 25


def test_fid_extractor_is_not_part_of_the_state_dict_but_follows_to():
    extractor = LinearFeatures()
    fid = FID(extractor)
    assert list(fid.parameters()) == [] and not any("proj" in k for k in fid.state_dict())
    holder = nn.Module()
    holder.fid = fid
    holder.to(torch.float64)
    assert extractor.proj.weight.dtype == torch.float64
    assert not extractor.training
    # forward() only accumulates
    fid = FID(LinearFeatures())
    assert fid(_images(4, 18), real=True) is None and int(fid.real_num_samples) == 4


# -- the feature extractor is given, never built here ------------------------------------------------------------


@pytest.mark.parametrize("metric", [FID, KID])
def test_a_metric_without_a_feature_extractor_says_which_to_pass(metric):
    with pytest.raises(TypeError) as err:
        metric(None)
    message = str(err.value)
    assert "anomgen.encoders.InceptionFeatures()" in message and "anomgen.encoders.RawPixels()" in message
    with pytest.raises(TypeError, match="must be an nn.Module"):
        metric(lambda images: images)


# -- KID --------------------------------------------------------------------------------------------------------------


def test_kid_matches_torchmetrics_on_whole_sets():
    from torchmetrics.image.kid import KernelInceptionDistance

    extractor = LinearFeatures()
    real, fake = _images(30, 19), _images(30, 20, lo=0.1)
    ours = KID(extractor, subsets=1, subset_size=30)
    theirs = KernelInceptionDistance(feature=extractor, normalize=True, subsets=1, subset_size=30)
    for metric in (ours, theirs):
        metric.update(real, real=True)
        metric.update(fake, real=False)
    # one subset of the whole sets: a permutation, to which the unbiased MMD² is invariant
    assert float(ours.compute()[0]) == pytest.approx(float(theirs.compute()[0]), rel=1e-4)
    gen = torch.Generator().manual_seed(22)
    a, b = torch.randn(50, 4, generator=gen), torch.randn(50, 4, generator=gen) + 1
    mean, std = kid_from_features(a, b, subsets=20, subset_size=20)
    assert mean > 0 and std > 0
    assert kid_from_features(a, b, subsets=20, subset_size=20) == (mean, std)  # seeded subsets: reproducible
    assert kid_from_features(a, b, subsets=20, subset_size=20, seed=1) != (mean, std)
    assert abs(kid_from_features(a, a + 0.0, subsets=20, subset_size=20)[0]) < mean / 10
    ours.reset()
    assert len(ours.real_features) == 1 and len(ours.fake_features) == 0


# -- density and coverage ---------------------------------------------------------------------------------------------


def _brute_density_coverage(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    n, m = len(real), len(fake)
    radii = []
    for i in range(n):
        dists = sorted(float(np.linalg.norm(real[i] - real[j])) for j in range(n) if j != i)
        radii.append(dists[k - 1])
    inside = 0
    covered = 0
    for i in range(n):
        hit = False
        for j in range(m):
            if np.linalg.norm(fake[j] - real[i]) < radii[i]:
                inside += 1
                hit = True
        covered += hit
    return inside / (k * m), covered / n


@pytest.mark.parametrize("k", [1, 3, 5])
def test_density_coverage_match_a_brute_force_loop(k):
    gen = np.random.default_rng(k)
    real = gen.normal(size=(25, 3))
    fake = gen.normal(size=(18, 3)) * 1.2 + 0.3
    expected = _brute_density_coverage(real, fake, k)
    for chunk_size in (1, 4, 1024):
        got = density_coverage(real, fake, k=k, chunk_size=chunk_size)
        assert got.density == pytest.approx(expected[0], abs=1e-12)
        assert got.coverage == pytest.approx(expected[1], abs=1e-12)
    assert 0 < expected[1] < 1 and expected[0] > 0


def test_density_coverage_trivial_cases():
    real = torch.randn(40, 6, generator=torch.Generator().manual_seed(21))
    same = density_coverage(real, real, k=5)
    assert same.coverage == 1.0 and same.density == pytest.approx(1.0)
    far = density_coverage(real, real + 100.0, k=5)
    assert far == (0.0, 0.0)
    with pytest.raises(MetricError, match="more than k"):
        density_coverage(real[:5], real, k=5)
