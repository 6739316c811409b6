"""DDIM: the references' grid, the step and generation against diffusers' DDIM scheduler, inversion written out as the
references do it; h-space hooks and mixing."""

from __future__ import annotations

import pytest
import torch

from anomgen.diffusion.ddim import (
    DDIMSchedule,
    EpsModel,
    ddim_generate,
    ddim_invert,
    ddim_step,
    predict_x0,
)
from anomgen.diffusion.hspace import (
    HSpace,
    edited_generation,
    eps_and_edited_eps,
    lerp_h,
    middle_block,
    mix_h,
    slerp_h,
)
from anomgen.diffusion.sde import tiny_score_unet
from anomgen.seeding import sample_generator


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return tiny_score_unet("vp", image_size=8, channels=3).eval()


def _diffusers_ddim(steps: int):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                          clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    sched.set_timesteps(steps)
    return sched


def test_the_default_grid_is_the_references_and_reaches_999():
    """Asyrp_official / InjectFusion: seq = [int(s + 1e-6) for s in linspace(0, 1, n) * 999], run downwards."""
    assert DDIMSchedule(10).timesteps == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    fifty = DDIMSchedule(50).timesteps
    assert len(fifty) == 50 and fifty[:4] == [999, 978, 958, 937] and fifty[-3:] == [40, 20, 0]
    assert DDIMSchedule(10, spacing="leading").timesteps == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    with pytest.raises(ValueError, match="spacing"):
        DDIMSchedule(10, spacing="trailing")


@torch.no_grad()
def test_generation_matches_diffusers_ddim_scheduler(unet):
    schedule, sched = DDIMSchedule(10, spacing="leading"), _diffusers_ddim(10)
    assert schedule.timesteps == [int(t) for t in sched.timesteps]
    eps = EpsModel(unet)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x = x_T
    for t in sched.timesteps:
        x = sched.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ddim_generate(eps, x_T, schedule), x, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_stochastic_step_matches_diffusers_eta_one(unet):
    schedule, sched = DDIMSchedule(10), _diffusers_ddim(10)
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    t, t_next = 500, 400
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    eps = unet(x, t).sample
    expected = sched.step(eps, t, x, eta=1.0, variance_noise=noise).prev_sample
    ours = ddim_step(x, eps, schedule.alpha_bar(t), schedule.alpha_bar(t_next), eta=1.0, noise=noise)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_inversion_evaluates_each_level_with_its_own_label(unet):
    """Written out as Asyrp_official / InjectFusion invert (``precompute_pairs``): the clean image stands at level 0;
    the step from level s to the next level t above uses ε(x_s, s) and ᾱ_s, ᾱ_t; no call at the top level."""
    levels = [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    alpha_bar = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    x0 = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(4)) * 2 - 1
    x = x0
    for s, t in zip(levels[:-1], levels[1:]):
        eps = unet(x, torch.full((2,), s)).sample
        a_s, a_t = float(alpha_bar[s]), float(alpha_bar[t])
        x = a_t**0.5 * (x - (1 - a_s) ** 0.5 * eps) / a_s**0.5 + (1 - a_t) ** 0.5 * eps
    seen = []
    ours = ddim_invert(EpsModel(unet), x0, DDIMSchedule(10), on_step=lambda t, _: seen.append(t))
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)
    assert seen == levels[:-1]


def test_asymmetric_step_independent_formula():
    g = torch.Generator().manual_seed(5)
    x, eps, eps_edit = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
    a_t, a_prev = 0.3, 0.6
    x0_edit = (x - (1 - a_t) ** 0.5 * eps_edit) / a_t**0.5
    expected = a_prev**0.5 * x0_edit + (1 - a_prev) ** 0.5 * eps
    torch.testing.assert_close(ddim_step(x, eps_edit, a_t, a_prev, eps_direction=eps), expected)
    torch.testing.assert_close(predict_x0(x, eps_edit, a_t), x0_edit)


def test_eps_model_drops_sigma_channels_and_rejects_odd_outputs():
    class Six(torch.nn.Module):
        def forward(self, x, t):
            return torch.cat([x + 1, x - 1], dim=1)

    x = torch.zeros(1, 3, 4, 4)
    torch.testing.assert_close(EpsModel(Six())(x, 3), x + 1)

    class Five(torch.nn.Module):
        def forward(self, x, t):
            return torch.zeros(1, 5, 4, 4)

    with pytest.raises(ValueError, match="got 5"):
        EpsModel(Five())(x, 3)


@torch.no_grad()
def test_hspace_captures_and_replaces_the_middle_block_output(unet):
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 10])
    captured = {}
    handle = middle_block(unet).register_forward_hook(lambda m, a, o: captured.setdefault("h", o.clone()))
    plain = unet(x, t).sample
    handle.remove()
    with HSpace(unet) as hs:
        assert torch.equal(unet(x, t).sample, plain)
        torch.testing.assert_close(hs.h, captured["h"])
        hs.edit = lambda h: h * 0
        edited = unet(x, t).sample
    assert not torch.allclose(edited, plain)
    assert torch.equal(unet(x, t).sample, plain)  # hook removed on exit


@torch.no_grad()
def test_eps_and_edited_eps_equals_two_separate_calls(unet):
    eps_model, x = EpsModel(unet), torch.randn(3, 3, 8, 8)
    with HSpace(unet) as hs:
        eps, eps_edit = eps_and_edited_eps(eps_model, hs, x, 700, lambda h: h + 1.0)
        hs.edit = lambda h: h + 1.0
        separate_edit = eps_model(x, 700)
        hs.edit = None
        separate = eps_model(x, 700)
    torch.testing.assert_close(eps, separate, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eps_edit, separate_edit, atol=1e-5, rtol=1e-5)


def test_mixing_lerp_and_slerp():
    g = torch.Generator().manual_seed(6)
    hs, hc = torch.randn(2, 4, 2, 2, generator=g), 3 * torch.randn(2, 4, 2, 2, generator=g)
    torch.testing.assert_close(lerp_h(hs, hc, 0.7), 0.3 * hs + 0.7 * hc)
    torch.testing.assert_close(slerp_h(hs, hc, 0.0), hs)
    norm_s = hs.flatten(1).norm(dim=1)
    rescaled = hc.flatten(1) * (norm_s / hc.flatten(1).norm(dim=1)).unsqueeze(1)
    torch.testing.assert_close(slerp_h(hs, hc, 1.0).flatten(1), rescaled, atol=1e-5, rtol=1e-5)
    mid = slerp_h(hs, hc, 0.5).flatten(1)
    torch.testing.assert_close(mid.norm(dim=1), norm_s, atol=1e-5, rtol=1e-5)  # stays on the sphere
    # the angle to each end is half the angle between the ends
    cos = torch.nn.functional.cosine_similarity
    half = torch.arccos(cos(hs.flatten(1), rescaled).clamp(-1, 1)) / 2
    torch.testing.assert_close(torch.arccos(cos(mid, hs.flatten(1)).clamp(-1, 1)), half, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="lerp"):
        mix_h(hs, hc, 0.5, "cubic")


@torch.no_grad()
def test_edited_generation_edits_only_at_and_above_t_edit_and_boosts_below(unet):
    schedule, eps_model = DDIMSchedule(10), EpsModel(unet)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    edited_at = []

    def edit(t, h):
        edited_at.append(t)
        return h

    with HSpace(unet) as hs:
        identity = edited_generation(eps_model, hs, x_T, schedule, edit, t_edit=500)
        assert sorted(set(edited_at)) == [t for t in sorted(schedule.timesteps) if t >= 500]
        # the batch-2B pass rounds differently; at t = 999, P_t divides by √ᾱ_999 ≈ 0.006, which grows it to ~1e-5
        torch.testing.assert_close(identity, ddim_generate(eps_model, x_T, schedule), atol=1e-4, rtol=1e-4)
        # boosting: stochastic, reproducible per sample generator, independent of the batch it is in
        gens = lambda: [sample_generator(0, i) for i in (4, 9)]  # noqa: E731
        a = edited_generation(eps_model, hs, x_T, schedule, edit, 500, t_boost=200, generators=gens())
        b = edited_generation(eps_model, hs, x_T[1:], schedule, edit, 500, t_boost=200, generators=gens()[1:])
        assert not torch.allclose(a, identity)
        torch.testing.assert_close(a[1:], b, atol=1e-5, rtol=1e-5)
        with pytest.raises(ValueError, match="Generator"):
            edited_generation(eps_model, hs, x_T, schedule, edit, 500, t_boost=200)
