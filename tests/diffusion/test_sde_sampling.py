"""Samplers of the score SDE (anomgen.diffusion.sde_sampling): single steps against the formulas, the whole loop
against a hand-written one, the sampled distribution against the known one, and per-sample seeding."""

from __future__ import annotations

import math

import pytest
import torch

from anomgen.diffusion.sde import (
    VESDE,
    VPSDE,
    make_sde,
    score_fn_from_unet,
    tiny_score_unet,
)
from anomgen.diffusion.sde_sampling import (
    euler_maruyama_predictor_step,
    euler_maruyama_sample,
    langevin_corrector_step,
    pc_sample,
    reverse_diffusion_predictor_step,
    time_grid,
)
from anomgen.seeding import sample_generator


def _gaussian_score(sde, s):
    """Exact score of x_t when x_0 ~ N(0, s² I): −x / (s² a(t)² + std(t)²)."""

    def score_fn(x, t):
        a, std = sde.marginal_prob(torch.ones_like(x), t)
        return -x / (s**2 * a**2 + std.reshape(-1, *([1] * (x.dim() - 1))) ** 2)

    return score_fn


def _toy_score(x, t):
    return -x / (1.0 + t.reshape(-1, *([1] * (x.dim() - 1)))) + 0.2 * torch.sin(2 * x)


# -------------------------------------------------------------------------- hand-written reference formulas


def _sigma_table(N, smin=0.01, smax=50.0):
    return [math.exp(math.log(smin) + i * (math.log(smax) - math.log(smin)) / (N - 1)) for i in range(N)]


def _beta_table(N, b0=0.1, b1=20.0):
    return [b0 / N + i * (b1 / N - b0 / N) / (N - 1) for i in range(N)]


def _hand_corrector(x, t, i, kind, N, snr, g, b1=20.0):
    grad = _toy_score(x, t)
    z = torch.randn(x.shape, generator=g, dtype=x.dtype)
    alpha = 1.0 if kind == "ve" else 1.0 - _beta_table(N, b1=b1)[i]
    out, mean = [], []
    for b in range(x.shape[0]):
        eps = 2 * alpha * (snr * z[b].norm() / grad[b].norm()) ** 2
        mean.append(x[b] + eps * grad[b])
        out.append(mean[-1] + torch.sqrt(2 * eps) * z[b])
    return torch.stack(out), torch.stack(mean)


def _hand_predictor(x, t, i, kind, N, g, b1=20.0):
    score = _toy_score(x, t)
    if kind == "ve":
        sig = _sigma_table(N)
        G = math.sqrt(sig[i] ** 2 - (sig[i - 1] ** 2 if i > 0 else 0.0))
        mean = x + G**2 * score
    else:
        beta = _beta_table(N, b1=b1)[i]
        G = math.sqrt(beta)
        mean = x - (math.sqrt(1 - beta) - 1) * x + beta * score
    z = torch.randn(x.shape, generator=g, dtype=x.dtype)
    return mean + G * z, mean


@pytest.mark.parametrize("kind", ["ve", "vp"])
def test_one_pc_step_matches_the_formulas(kind):
    N, snr, i = 1000, 0.16, 613
    sde = make_sde(kind, N=N)
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.full((3,), i / (N - 1), dtype=torch.float64)

    g = torch.Generator().manual_seed(11)
    xc, xc_mean = langevin_corrector_step(x, t, _toy_score, sde, snr, g)
    xp, xp_mean = reverse_diffusion_predictor_step(xc, t, _toy_score, sde, g)

    h = torch.Generator().manual_seed(11)  # same stream, drawn by hand in the same order
    hc, hc_mean = _hand_corrector(x, t, i, kind, N, snr, h)
    hp, hp_mean = _hand_predictor(hc, t, i, kind, N, h)
    torch.testing.assert_close(xc_mean, hc_mean)
    torch.testing.assert_close(xc, hc)
    torch.testing.assert_close(xp_mean, hp_mean)
    torch.testing.assert_close(xp, hp)


def test_corrector_batch_norms_are_the_reference_batch_average():
    sde, snr = VESDE(), 0.16
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.full((4,), 0.3, dtype=torch.float64)
    out, _ = langevin_corrector_step(
        x, t, _toy_score, sde, snr, torch.Generator().manual_seed(1), corrector_norms="batch"
    )
    grad = _toy_score(x, t)
    z = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    eps = 2 * (snr * z.norm(dim=1).mean() / grad.norm(dim=1).mean()) ** 2
    torch.testing.assert_close(out, x + eps * grad + torch.sqrt(2 * eps) * z)
    with pytest.raises(ValueError, match="corrector_norms"):
        langevin_corrector_step(x, t, _toy_score, sde, snr, None, corrector_norms="global")


def test_euler_maruyama_step_matches_the_formula():
    sde = VPSDE()
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.full((3,), 0.4, dtype=torch.float64)
    out, mean = euler_maruyama_predictor_step(x, t, _toy_score, sde, torch.Generator().manual_seed(2), dt=-0.01)
    beta = 0.1 + 0.4 * 19.9
    expected_mean = x + (-0.5 * beta * x - beta * _toy_score(x, t)) * -0.01
    z = torch.randn(3, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    torch.testing.assert_close(mean, expected_mean)
    torch.testing.assert_close(out, expected_mean + math.sqrt(beta) * 0.1 * z)


@pytest.mark.parametrize("kind", ["ve", "vp"])
@pytest.mark.parametrize("denoise", [True, False])
def test_pc_loop_matches_a_hand_written_loop(kind, denoise):
    """A 4-level chain end to end: prior, then per time corrector then predictor, last mean returned with denoise."""
    N, snr, b1 = 4, 0.2, 2.0
    sde = VESDE(N=N) if kind == "ve" else VPSDE(N=N, beta_max=b1)
    out = pc_sample(
        _toy_score,
        sde,
        (3, 5),
        torch.Generator().manual_seed(4),
        snr=snr,
        denoise=denoise,
        progress=False,
        dtype=torch.float64,
    )
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 5, generator=g, dtype=torch.float64) * (50.0 if kind == "ve" else 1.0)
    times = torch.linspace(1.0, sde.eps, N, dtype=torch.float32)  # the sampler hands float32 times to score_fn
    for k in range(N):
        i = N - 1 - k
        t = torch.full((3,), float(times[k]), dtype=torch.float64)
        x, _ = _hand_corrector(x, t, i, kind, N, snr, g, b1)
        x, x_mean = _hand_predictor(x, t, i, kind, N, g, b1)
    torch.testing.assert_close(out, x_mean if denoise else x)


# -------------------------------------------------------------------------- the sampled distribution


S = 0.5  # data: x_0 ~ N(0, S² I)


@pytest.mark.parametrize("kind", ["ve", "vp"])
@pytest.mark.parametrize(
    "sampler, kwargs, shape, tol",
    [
        # Euler–Maruyama, N = 1000
        ("em", {}, (2000, 4), 0.05),
        # reverse-diffusion predictor alone, N = 1000
        ("pc", {"n_steps_corrector": 0}, (2000, 4), 0.04),
        # full PC with the reference's batch-averaged Langevin norms (works in any dimension; snr 0.16 adds ~3 %)
        ("pc", {"corrector_norms": "batch"}, (2000, 4), 0.07),
        # full PC with the default per-sample norms, in a dimension where they concentrate (bias ~1/d)
        ("pc", {}, (200, 256), 0.08),
    ],
)
def test_samples_of_a_gaussian_have_its_variance(kind, sampler, kwargs, shape, tol):
    sde = make_sde(kind)
    fn = euler_maruyama_sample if sampler == "em" else pc_sample
    x = fn(_gaussian_score(sde, S), sde, shape, torch.Generator().manual_seed(0), progress=False, **kwargs)
    assert x.shape == shape and torch.isfinite(x).all()
    assert abs(x.mean().item()) < 0.03
    ratio = x.var().item() / S**2
    assert abs(ratio - 1.0) < tol, ratio


# -------------------------------------------------------------------------- per-sample seeding


@pytest.mark.parametrize("kind", ["ve", "vp"])
@pytest.mark.parametrize("sampler", ["pc", "em"])
def test_a_sample_does_not_depend_on_its_batch(kind, sampler):
    sde = make_sde(kind)
    fn = pc_sample if sampler == "pc" else euler_maruyama_sample
    score_fn = _gaussian_score(sde, S)
    kw = {"num_steps": 25, "progress": False}
    batch = fn(score_fn, sde, (5, 1, 3, 3), [sample_generator(7, i) for i in range(10, 15)], **kw)
    alone = fn(score_fn, sde, (1, 1, 3, 3), [sample_generator(7, 12)], **kw)
    assert torch.equal(batch[2], alone[0])
    other = fn(score_fn, sde, (1, 1, 3, 3), [sample_generator(7, 13)], **kw)
    assert torch.equal(batch[3], other[0]) and not torch.equal(alone, other)


def test_a_unet_sample_does_not_depend_on_its_batch():
    sde = VESDE()
    unet = tiny_score_unet("ve", image_size=8, channels=1).eval()
    score_fn = score_fn_from_unet(unet, sde)
    kw = {"num_steps": 6, "progress": False}
    batch = pc_sample(score_fn, sde, (4, 1, 8, 8), [sample_generator(3, i) for i in range(4)], **kw)
    alone = pc_sample(score_fn, sde, (1, 1, 8, 8), [sample_generator(3, 1)], **kw)
    torch.testing.assert_close(batch[1], alone[0], rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------- time grid


def test_strided_grid_counts_score_calls_and_full_grid_is_the_default():
    sde = VESDE()
    calls = []

    def counting(x, t):
        calls.append(float(t[0]))
        return _gaussian_score(sde, S)(x, t)

    pc_sample(
        counting, sde, (2, 3), torch.Generator().manual_seed(0), num_steps=10, n_steps_corrector=2, progress=False
    )
    assert len(calls) == 10 * 3 and calls[0] == 1.0 and abs(calls[-1] - sde.eps) < 1e-7
    a = pc_sample(_gaussian_score(sde, S), sde, (2, 3), torch.Generator().manual_seed(0), progress=False)
    b = pc_sample(_gaussian_score(sde, S), sde, (2, 3), torch.Generator().manual_seed(0), num_steps=1000, progress=True)
    assert torch.equal(a, b)
    grid = time_grid(sde, 10)
    assert len(grid) == 10 and grid[0] == 1.0
    with pytest.raises(ValueError, match="cannot exceed"):
        time_grid(sde, 1001)


def _strided_variance_recursion(s, steps, N=1000, eps=1e-5):
    """Exact variance of the VE reverse-diffusion chain on the strided grid with the exact Gaussian score:
    x_mean = x (s² + σ_j²) / (s² + σ_i²), V' = V ((s² + σ_j²) / (s² + σ_i²))² + σ_i² − σ_j², from V = σ_max²."""
    sig = _sigma_table(N)
    full = [1.0 - k * (1.0 - eps) / (N - 1) for k in range(N)]
    picks = [round(k * (N - 1) / (steps - 1)) for k in range(steps)]
    idx = [N - 1 - p for p in picks] + [-1]  # grid index of each strided time; -1: no noise
    assert all(abs(full[p] * (N - 1) - (N - 1 - p)) < 1e-2 for p in picks)
    v = 50.0**2
    for k in range(steps):
        si2, sj2 = sig[idx[k]] ** 2, (sig[idx[k + 1]] ** 2 if idx[k + 1] >= 0 else 0.0)
        v = v * ((s * s + sj2) / (s * s + si2)) ** 2 + (si2 - sj2)
    return v - si2  # the denoised output: the last mean, without the last noise (σ_0² − 0)


@pytest.mark.parametrize("steps", [100, 250])
def test_strided_predictor_matches_the_exact_chain_variance(steps):
    """A strided VE chain lands where the exact variance recursion of its own steps says (first-order overshoot)."""
    sde = VESDE()
    x = pc_sample(
        _gaussian_score(sde, S),
        sde,
        (2000, 8),
        torch.Generator().manual_seed(0),
        num_steps=steps,
        n_steps_corrector=0,
        progress=False,
    )
    expected = _strided_variance_recursion(S, steps)
    assert expected / S**2 > 1.02  # the overshoot is real at these step counts...
    assert abs(x.var().item() / expected - 1.0) < 0.04  # ...and the sampler reproduces it


def test_strided_vp_predictor_lands_near_the_data_variance():
    sde = VPSDE()
    x = pc_sample(
        _gaussian_score(sde, S),
        sde,
        (2000, 8),
        torch.Generator().manual_seed(0),
        num_steps=250,
        n_steps_corrector=0,
        progress=False,
    )
    assert abs(x.var().item() / S**2 - 1.0) < 0.06
