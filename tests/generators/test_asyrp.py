"""Asyrp: the learned h-space edit starts as no edit, the loss is the written-out directional CLIP + L1 loss, only
DeltaH trains, α scales the edit and the edit acts only at t >= t_edit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anomgen.diffusion import tiny_score_unet
from anomgen.diffusion.ddim import DDIMSchedule, EpsModel, ddim_generate, ddim_invert
from anomgen.generators.asyrp import Asyrp, DeltaH, OpenCLIPGuide

STEPS, T_EDIT = 6, 400  # timesteps 999, 799, 599, 399, 199, 0: the first three are edited




def _asyrp(tiny_clip_name, seed=0, **kw):
    torch.manual_seed(seed)
    unet = tiny_score_unet("vp", image_size=16)
    guide = OpenCLIPGuide(tiny_clip_name, pretrained=None)
    return Asyrp(unet, guide, DDIMSchedule(STEPS), t_edit=kw.pop("t_edit", T_EDIT), **kw)


def _images(n=3, seed=0):
    """Smooth random RGB images in [0, 1] (16 × 16)."""
    g = torch.Generator().manual_seed(seed)
    return F.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(16, 16), mode="bilinear", align_corners=False)


def _set_edit(asyrp, seed=1, std=0.5):
    """Make Δh non-zero (the last layer is zero-initialised)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        asyrp.delta_h.conv_out.weight.copy_(torch.randn(asyrp.delta_h.conv_out.weight.shape, generator=g) * std)


def test_untrained_edit_is_no_edit(tiny_clip_name):
    asyrp = _asyrp(tiny_clip_name)
    h = torch.randn(2, 32, 8, 8)
    assert torch.equal(asyrp.delta_h(h, 700), torch.zeros_like(h))
    x_T = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    edited = asyrp.generate(x_T, [0.5, 1.0, 3.0])
    plain = ddim_generate(EpsModel(asyrp.eps_model.unet), x_T, asyrp.schedule)
    # ε̃ = ε here; the edited loop evaluates a batch of 2B, so only rounding differs (grown by a random UNet, whose
    # samples run far outside [-1, 1])
    assert torch.allclose(edited, ((plain + 1) / 2).clamp(0, 1), atol=1e-4)


def test_inversion_trajectory_matches_written_out_ddim(tiny_clip_name):
    asyrp = _asyrp(tiny_clip_name)
    unet = asyrp.eps_model.unet
    images = _images()
    trajectory = asyrp.invert(images)
    alpha_bar = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    levels = [0, 199, 399, 599, 799, 999]  # int(s + 1e-6) of linspace(0, 1, 6) · 999
    # upwards from the clean image at level 0: the step from level s calls the model at x_s with label s
    x, states = images * 2 - 1, {}
    with torch.no_grad():
        for s, t in zip(levels[:-1], levels[1:]):
            eps = unet(x, torch.full((len(x),), s)).sample
            a_s, a_t = float(alpha_bar[s]), float(alpha_bar[t])
            x = a_t**0.5 * (x - (1 - a_s) ** 0.5 * eps) / a_s**0.5 + (1 - a_t) ** 0.5 * eps
            states[t] = x
    edited = [t for t in sorted(states, reverse=True) if t >= T_EDIT]
    assert asyrp.edit_timesteps == edited == [999, 799, 599]
    assert trajectory.shape == (3, len(edited), 3, 16, 16)
    for k, t in enumerate(edited):
        assert torch.allclose(trajectory[:, k], states[t], atol=1e-5), t
    assert torch.allclose(trajectory[:, 0], ddim_invert(EpsModel(unet), images * 2 - 1, asyrp.schedule), atol=1e-6)


def test_loss_matches_written_out_computation(tiny_clip_name):
    import open_clip
    from diffusers import DDIMScheduler

    asyrp = _asyrp(tiny_clip_name, target_text="a photo of a damaged {class}", lambda_clip=0.7, lambda_l1=2.0)
    _set_edit(asyrp)
    images, categories = _images(), ["screw", "nut", "screw"]
    trajectories = asyrp.invert(images)
    loss, parts = asyrp.loss(images, trajectories, torch.Generator().manual_seed(5), categories=categories)
    t = int(parts["timestep"])
    assert t in asyrp.edit_timesteps
    x_t = trajectories[:, asyrp.edit_timesteps.index(t)]

    unet, model = asyrp.eps_model.unet, asyrp.clip.encoder.model
    alpha_bar = float(DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02).alphas_cumprod[t])
    timestep = torch.full((3,), t)
    with torch.no_grad():
        eps = unet(x_t, timestep).sample
        handle = unet.mid_block.register_forward_hook(lambda m, args, out: out + asyrp.delta_h(out, t))
        eps_edited = unet(x_t, timestep).sample
        handle.remove()
        x0_edited = (x_t - (1 - alpha_bar) ** 0.5 * eps_edited) / alpha_bar**0.5
        x0_plain = (x_t - (1 - alpha_bar) ** 0.5 * eps) / alpha_bar**0.5
        mean = torch.tensor(model.visual.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(model.visual.image_std).view(1, 3, 1, 1)

        def embed_images(x):
            x = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
            f = model.encode_image((x - mean) / std)
            return f / f.norm(dim=-1, keepdim=True)

        tokenize = open_clip.get_tokenizer(tiny_clip_name)
        texts = model.encode_text(tokenize([f"a photo of a damaged {c}" for c in categories]))
        texts = texts / texts.norm(dim=-1, keepdim=True)
        source = embed_images(images)
        edited = embed_images(((x0_edited + 1) / 2).clamp(0, 1))
        a, b = edited - source, texts - source
        expected_clip = (1 - (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean()
        expected_l1 = (x0_edited - x0_plain).abs().mean()
    assert expected_l1 > 0  # the edit is not trivial
    assert torch.allclose(parts["clip"], expected_clip, atol=1e-5)
    assert torch.allclose(parts["l1"], expected_l1, atol=1e-6)
    assert torch.allclose(loss, 0.7 * expected_clip + 2.0 * expected_l1, atol=1e-5)


def test_guide_keeps_gradients_and_matches_the_detector_encoder(tiny_clip_name):
    from anomgen.encoders import OpenCLIPImageEncoder

    guide = OpenCLIPGuide(tiny_clip_name, pretrained=None)
    detector = OpenCLIPImageEncoder(tiny_clip_name, pretrained=None)
    detector.model.load_state_dict(guide.encoder.model.state_dict())
    images = _images(2).requires_grad_(True)
    features = guide.encode_images(images)
    assert torch.allclose(features.detach(), detector(images.detach()), atol=1e-6)
    features.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    texts = guide.encode_texts(["a photo of something strange", "a photo of a screw"])
    assert texts.shape == (2, 16) and torch.allclose(texts.norm(dim=-1), torch.ones(2), atol=1e-5)


def test_training_reduces_the_loss_and_only_deltah_changes(tiny_clip_name):
    asyrp = _asyrp(tiny_clip_name, lambda_l1=0.5)
    asyrp.train()
    assert not asyrp.eps_model.training and not asyrp.clip.training  # frozen parts stay in eval mode
    frozen = {name: p.detach().clone() for name, p in asyrp.named_parameters() if not name.startswith("delta_h.")}
    assert frozen and not any(p.requires_grad for n, p in asyrp.named_parameters() if not n.startswith("delta_h."))
    images = _images(2)
    trajectories = asyrp.invert(images)
    optimizer = torch.optim.Adam(asyrp.delta_h.parameters(), lr=1e-2)

    def step_loss():  # the same timestep every time
        return asyrp.loss(images, trajectories, torch.Generator().manual_seed(0))[0]

    with torch.no_grad():
        before = step_loss().item()
    for _ in range(8):
        optimizer.zero_grad()
        step_loss().backward()
        optimizer.step()
    with torch.no_grad():
        after = step_loss().item()
    assert after < before - 1e-3, (before, after)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in asyrp.delta_h.parameters())
    for name, p in asyrp.named_parameters():
        if name in frozen:
            assert p.grad is None and torch.equal(p, frozen[name]), name


def test_alpha_scales_the_edit_only_at_t_edit_and_above(tiny_clip_name):
    asyrp = _asyrp(tiny_clip_name)
    _set_edit(asyrp)
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    plain = ((ddim_generate(asyrp.eps_model, x_T, asyrp.schedule) + 1) / 2).clamp(0, 1)
    calls = []
    hook = asyrp.delta_h.register_forward_pre_hook(lambda m, args: calls.append(int(args[1])))
    one = asyrp.generate(x_T, [1.0, 1.0])
    hook.remove()
    assert calls == [999, 799, 599]  # one call per edited step, none below t_edit
    assert torch.allclose(asyrp.generate(x_T, [0.0, 0.0]), plain, atol=1e-4)
    two = asyrp.generate(x_T, [2.0, 2.0])
    assert (one - plain).abs().max() > 1e-3 and (two - one).abs().max() > 1e-3
    mixed = asyrp.generate(x_T, [0.0, 2.0])  # per-sample strengths
    assert torch.allclose(mixed[0], plain[0], atol=1e-4) and torch.allclose(mixed[1], two[1], atol=1e-4)
    with torch.no_grad():  # α·Δh is linear in the last layer: α = 2 equals α = 1 with that layer doubled
        asyrp.delta_h.conv_out.weight.mul_(2)
    assert torch.allclose(asyrp.generate(x_T, [1.0, 1.0]), two, atol=1e-4)


def test_boosting_noise_comes_from_each_samples_generator(tiny_clip_name):
    asyrp = _asyrp(tiny_clip_name, t_boost=200)
    _set_edit(asyrp)
    x_T = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="t_boost=200"):
        asyrp.generate(x_T, [1.0, 1.0])
    both = asyrp.generate(x_T, [1.0, 1.0], [torch.Generator().manual_seed(s) for s in (7, 8)])
    alone = asyrp.generate(x_T[1:], [1.0], [torch.Generator().manual_seed(8)])
    other = asyrp.generate(x_T[1:], [1.0], [torch.Generator().manual_seed(9)])
    # a random UNet drives x far out of [-1, 1]: batch-size rounding differences grow to ~1e-5 there
    assert torch.allclose(both[1:], alone, atol=1e-4)
    assert (other - alone).abs().max() > 1e-3


def test_bad_settings_are_errors(tiny_clip_name):
    with pytest.raises(ValueError, match="t_edit=1000"):
        _asyrp(tiny_clip_name, t_edit=1000)
    asyrp = _asyrp(tiny_clip_name, target_text="a photo of a damaged {class}")
    with pytest.raises(ValueError, match="category"):
        asyrp.target_texts(None, 2)
    assert asyrp.target_texts(["bottle"], 1) == ["a photo of a damaged bottle"]
    with pytest.raises(ValueError, match="edit strengths"):
        asyrp.generate(torch.zeros(2, 3, 16, 16), [1.0])
    with pytest.raises(ValueError, match="h_channels"):
        Asyrp(torch.nn.Conv2d(3, 3, 1), asyrp.clip, asyrp.schedule)


def test_deltah_is_small_and_timestep_dependent():
    delta = DeltaH(32, hidden_channels=16, time_embed_dim=8)
    torch.nn.init.normal_(delta.conv_out.weight)
    h = torch.randn(2, 32, 4, 4)
    assert delta(h, 900).shape == h.shape
    assert not torch.allclose(delta(h, 900), delta(h, 500))
    assert all(m.kernel_size == (1, 1) for m in (delta.conv_in, delta.conv_out))
