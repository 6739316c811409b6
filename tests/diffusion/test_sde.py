"""The SDEs, the denoising score-matching loss and the score-network conventions (anomgen.diffusion.sde)."""

from __future__ import annotations

import math

import pytest
import torch

from anomgen.diffusion.sde import (
    VESDE,
    VPSDE,
    dsm_loss,
    make_sde,
    score_fn_from_unet,
    score_unet,
    tiny_score_unet,
)
from anomgen.pixels import to_diffusion_range

TIMES = torch.tensor([1e-5, 0.1, 0.37, 0.5, 0.9, 1.0], dtype=torch.float64)


def _gaussian_score(sde, s):
    """Exact score of x_t when x_0 ~ N(0, s² I): −x / (s² a(t)² + std(t)²)."""

    def score_fn(x, t):
        a, std = sde.marginal_prob(torch.ones_like(x), t)
        return -x / (s**2 * a**2 + std.reshape(-1, *([1] * (x.dim() - 1))) ** 2)

    return score_fn


# ---------------------------------------------------------------------------------------------------- closed forms


def test_ve_marginal_prob_closed_form():
    sde = VESDE(sigma_min=0.01, sigma_max=50.0)
    x = torch.randn(len(TIMES), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mean, std = sde.marginal_prob(x, TIMES)
    expected = torch.tensor([0.01 * (50.0 / 0.01) ** float(t) for t in TIMES], dtype=torch.float64)
    torch.testing.assert_close(std, expected)
    torch.testing.assert_close(mean, x)
    assert sde.T == 1.0 and sde.eps == 1e-5 and sde.N == 1000


def test_vp_marginal_prob_closed_form():
    b0, b1 = 0.1, 20.0
    sde = VPSDE(beta_min=b0, beta_max=b1)
    x = torch.randn(len(TIMES), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mean, std = sde.marginal_prob(x, TIMES)
    coeff = torch.tensor(
        [math.exp(-0.25 * float(t) ** 2 * (b1 - b0) - 0.5 * float(t) * b0) for t in TIMES], dtype=torch.float64
    )
    torch.testing.assert_close(mean, coeff[:, None] * x)
    torch.testing.assert_close(std, torch.sqrt(1.0 - coeff**2), rtol=1e-6, atol=1e-9)
    assert sde.eps == 1e-3


def test_ve_marginal_variance_solves_the_sde():
    # d std²/dt = g(t)² for the VE SDE (drift 0)
    sde = VESDE()
    x = torch.zeros(4, 1, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9], dtype=torch.float64)
    h = 1e-6
    dvar = (sde.marginal_prob(x, t + h)[1] ** 2 - sde.marginal_prob(x, t - h)[1] ** 2) / (2 * h)
    drift, g = sde.sde(torch.ones(4, 1, dtype=torch.float64), t)
    torch.testing.assert_close(dvar, g**2, rtol=1e-6, atol=0)
    assert torch.all(drift == 0)


def test_vp_marginal_variance_solves_the_sde():
    # for x_0 = 0: std² = 1 − exp(−∫_0^t β), integrated numerically from the SDE's own diffusion
    sde = VPSDE()
    for t in (0.05, 0.4, 1.0):
        s = torch.linspace(0.0, t, 20001, dtype=torch.float64)
        beta = sde.sde(torch.zeros(len(s), 1, dtype=torch.float64), s)[1] ** 2
        integral = torch.trapezoid(beta, s)
        std = sde.marginal_prob(torch.zeros(1, 1, dtype=torch.float64), torch.tensor([t], dtype=torch.float64))[1]
        torch.testing.assert_close(std**2, (1.0 - torch.exp(-integral)).reshape(1), rtol=1e-7, atol=1e-9)
    drift, _ = sde.sde(torch.full((1, 2), 3.0, dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64))
    torch.testing.assert_close(drift, torch.full((1, 2), -0.5 * (0.1 + 0.5 * 19.9) * 3.0, dtype=torch.float64))


def test_prior_sampling_scales_and_per_sample_generators():
    ve, vp = VESDE(), VPSDE()
    big = ve.prior_sampling((4000, 2), torch.Generator().manual_seed(0))
    assert abs(big.std().item() / 50.0 - 1.0) < 0.03
    assert abs(vp.prior_sampling((4000, 2), torch.Generator().manual_seed(0)).std().item() - 1.0) < 0.03
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    rows = vp.prior_sampling((3, 2, 2), gens)
    for i in range(3):
        torch.testing.assert_close(rows[i], torch.randn(2, 2, generator=torch.Generator().manual_seed(i)))
    with pytest.raises(ValueError, match="one generator per sample"):
        vp.prior_sampling((2, 2), gens)


# ---------------------------------------------------------------------------------------------------- discretize


def test_ve_discretize_is_the_geometric_chain():
    sde = VESDE(sigma_min=0.01, sigma_max=50.0, N=10)
    sigmas = [0.01 * (50.0 / 0.01) ** (i / 9) for i in range(10)]
    x = torch.ones(10, 2)
    t = torch.tensor([i / 9 for i in range(10)])  # grid time of index i
    f, G = sde.discretize(x, t)
    expected = torch.tensor([sigmas[0]] + [math.sqrt(sigmas[i] ** 2 - sigmas[i - 1] ** 2) for i in range(1, 10)])
    torch.testing.assert_close(G, expected.float())
    assert torch.all(f == 0)
    # strided: from index 7 straight to index 3
    _, G73 = sde.discretize(x[:1], torch.tensor([7 / 9]), torch.tensor([3 / 9]))
    torch.testing.assert_close(G73, torch.tensor([math.sqrt(sigmas[7] ** 2 - sigmas[3] ** 2)]))
    # t_next on the neighbour is the plain step
    t5 = torch.full((10,), 5 / 9)
    torch.testing.assert_close(sde.discretize(x, t5, 4 / 9)[1], sde.discretize(x, t5)[1])
    torch.testing.assert_close(sde.discretize(x, t5)[1], torch.full((10,), math.sqrt(sigmas[5] ** 2 - sigmas[4] ** 2)))


def test_vp_discretize_is_the_ddpm_step():
    N = 10
    sde = VPSDE(beta_min=0.1, beta_max=5.0, N=N)  # β_i = linspace(β_min / N, β_max / N, N)
    betas = [0.1 / N + i * (5.0 / N - 0.1 / N) / (N - 1) for i in range(N)]
    x = torch.full((N, 3), 2.0, dtype=torch.float64)
    t = torch.tensor([i / (N - 1) for i in range(N)], dtype=torch.float64)
    f, G = sde.discretize(x, t)
    torch.testing.assert_close(G, torch.tensor([math.sqrt(b) for b in betas], dtype=torch.float64))
    expected_f = torch.tensor([(math.sqrt(1 - b) - 1) * 2.0 for b in betas], dtype=torch.float64)
    torch.testing.assert_close(f, expected_f[:, None].expand(N, 3))
    torch.testing.assert_close(sde.langevin_alpha(x, t), torch.tensor([1 - b for b in betas], dtype=torch.float64))
    # strided: a = Π α over the skipped indices
    a = math.prod(1 - b for b in betas[3:8])  # from index 7 down to index 2
    f, G = sde.discretize(x[:1], torch.tensor([7 / 9], dtype=torch.float64), torch.tensor([2 / 9], dtype=torch.float64))
    torch.testing.assert_close(G, torch.tensor([math.sqrt(1 - a)], dtype=torch.float64))
    torch.testing.assert_close(f, torch.full((1, 3), (math.sqrt(a) - 1) * 2.0, dtype=torch.float64))


def test_grid_index_of_float32_grid_times():
    sde = VESDE()
    times = torch.linspace(1.0, 1e-5, 1000)  # the sampler's grid, rounded to float32
    assert torch.equal(sde.timestep_index(times), torch.arange(999, -1, -1))


def test_make_sde():
    assert isinstance(make_sde("VE", sigma_max=10.0), VESDE)
    assert isinstance(make_sde("vp"), VPSDE)
    with pytest.raises(ValueError, match="unknown SDE kind"):
        make_sde("subvp")


def test_make_sde_takes_the_chosen_kind_s_schedule_from_both():
    """A config holds both schedules and switches by kind alone (model.sde.kind=ve used to fail with "unexpected
    keyword 'beta_min'"); any other unknown keyword is still an error."""
    from anomgen.errors import ConfigError

    both = {"beta_min": 0.2, "beta_max": 10.0, "sigma_min": 0.02, "sigma_max": 30.0, "N": 500}
    ve, vp = make_sde("ve", **both), make_sde("vp", **both)
    assert isinstance(ve, VESDE) and (ve.sigma_min, ve.sigma_max, ve.N) == (0.02, 30.0, 500)
    assert isinstance(vp, VPSDE) and (vp.beta_min, vp.beta_max, vp.N) == (0.2, 10.0, 500)
    with pytest.raises(TypeError, match="sigma_mxa"):
        make_sde("ve", sigma_mxa=3.0)
    with pytest.raises(ConfigError, match=r"unknown SDE kind 'subvp' \(model.sde.kind\)"):
        make_sde("subvp", **both)


# ---------------------------------------------------------------------------------------------------- DSM loss


def _toy_score(x, t):
    return -x * (1.0 + t.reshape(-1, *([1] * (x.dim() - 1)))) + 0.3 * torch.sin(3 * x)


@pytest.mark.parametrize("kind", ["ve", "vp"])
@pytest.mark.parametrize("likelihood_weighting", [False, True])
@pytest.mark.parametrize("reduce_mean", [True, False])
def test_dsm_loss_matches_a_hand_computation(kind, likelihood_weighting, reduce_mean):
    sde = make_sde(kind)
    x0 = torch.rand(5, 2, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    eps = 1e-5
    loss = dsm_loss(_toy_score, x0, sde, torch.Generator().manual_seed(7), eps, likelihood_weighting, reduce_mean)

    g = torch.Generator().manual_seed(7)
    t = torch.rand(5, generator=g, dtype=torch.float64) * (1.0 - eps) + eps
    z = torch.randn(5, 2, 3, 3, generator=g, dtype=torch.float64)
    per_sample = []
    for i in range(5):
        ti = float(t[i])
        if kind == "ve":
            a, std = 1.0, 0.01 * (50.0 / 0.01) ** ti
            g2 = (std * math.sqrt(2 * math.log(50.0 / 0.01))) ** 2
        else:
            log_a = -0.25 * ti**2 * (20.0 - 0.1) - 0.5 * ti * 0.1
            a, std = math.exp(log_a), math.sqrt(1 - math.exp(2 * log_a))
            g2 = 0.1 + ti * (20.0 - 0.1)
        xt = a * x0[i] + std * z[i]
        s = -xt * (1.0 + ti) + 0.3 * torch.sin(3 * xt)
        sq = ((s + z[i] / std) ** 2) * (g2 if likelihood_weighting else std**2)
        per_sample.append(sq.mean() if reduce_mean else sq.sum())
    torch.testing.assert_close(loss, torch.stack(per_sample).mean())


@pytest.mark.parametrize("kind", ["ve", "vp"])
def test_optimal_gaussian_score_has_the_lowest_dsm_loss(kind):
    sde, s = make_sde(kind), 0.5
    x0 = s * torch.randn(4096, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    best = _gaussian_score(sde, s)

    def loss(score_fn):  # common random numbers: the same t and z for every candidate
        return dsm_loss(score_fn, x0, sde, torch.Generator().manual_seed(3)).item()

    optimum = loss(best)
    for scale in (0.8, 0.95, 1.05, 1.25):
        assert loss(lambda x, t, c=scale: c * best(x, t)) > optimum
    assert loss(lambda x, t: best(x, t) + 0.1) > optimum
    # and the optimum is the closed form E[s² / (s² a² + std²) · a² ...]: the loss at the optimum is below 1
    assert 0.0 < optimum < 1.0


# ---------------------------------------------------------------------------------------------------- score networks


def test_ve_unet_conditions_on_sigma_and_is_divided_by_it_once():
    sde = VESDE()
    unet = tiny_score_unet("ve", image_size=8, channels=1).eval()
    assert unet.config.time_embedding_type == "fourier"
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.2, 0.8])
    sigma = 0.01 * (50.0 / 0.01) ** t
    raw = {}
    hook = unet.conv_out.register_forward_hook(lambda m, i, o: raw.setdefault("h", o))
    with torch.no_grad():
        score = score_fn_from_unet(unet, sde)(x, t)
    hook.remove()
    # the network output before diffusers' division, divided by σ exactly once
    torch.testing.assert_close(score, raw["h"] / sigma[:, None, None, None])
    with torch.no_grad():
        torch.testing.assert_close(score, unet(x, sigma).sample)


def test_vp_unet_conditions_on_999_t_and_predicts_noise():
    sde = VPSDE()
    unet = tiny_score_unet("vp", image_size=8, channels=1).eval()
    assert unet.config.time_embedding_type == "positional"
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.2, 0.8])
    _, std = sde.marginal_prob(x, t)
    with torch.no_grad():
        score = score_fn_from_unet(unet, sde)(x, t)
        eps_hat = unet(x, t * 999).sample
    torch.testing.assert_close(score, -eps_hat / std[:, None, None, None])
    with pytest.raises(ValueError, match="Fourier"):
        score_fn_from_unet(tiny_score_unet("ve", image_size=8, channels=1), sde)


def test_score_unet_builder_places_attention_by_resolution():
    unet = score_unet(
        "vp", image_size=32, channels=3, block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4
    )
    assert unet.config.down_block_types == ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D")
    assert unet.config.up_block_types == ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D")
    assert unet.config.time_embedding_type == "positional"
    assert score_unet("VE", 16, 1, block_out_channels=(8, 8), norm_num_groups=4).config.time_embedding_type == "fourier"
    with pytest.raises(ValueError, match="unknown SDE kind"):
        tiny_score_unet("xx")


@pytest.mark.parametrize("kind", ["ve", "vp"])
def test_tiny_unet_learns_with_the_dsm_loss(kind):
    torch.manual_seed(0)
    sde = make_sde(kind)
    unet = tiny_score_unet(kind, image_size=8, channels=1)
    score_fn = score_fn_from_unet(unet, sde)
    optimizer = torch.optim.Adam(unet.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    levels = torch.linspace(0.1, 0.9, 8)  # toy data: 8×8 images of a constant grey level in [0, 1]
    losses = []
    for _ in range(150):
        grey = levels[torch.randint(0, 8, (16,), generator=gen)]
        x0 = to_diffusion_range(grey[:, None, None, None].expand(16, 1, 8, 8))
        loss = dsm_loss(score_fn, x0, sde, gen)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.7 * first, (first, last)
