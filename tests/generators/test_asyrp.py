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


_ALPHA_BAR = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
_LEVELS = [0, 199, 399, 599, 799, 999]  # int(s + 1e-6) of linspace(0, 1, 6) · 999


def _a(t: int) -> float:
    return 1.0 if t < 0 else float(_ALPHA_BAR[t])


def _hand_eps(unet, x, t, delta_h=None):
    """ε(x, t) of the bare UNet; with ``delta_h``, the mid-block output h is replaced by h + delta_h(h, t)."""
    handle = None if delta_h is None else unet.mid_block.register_forward_hook(
        lambda m, args, out: out + delta_h(out, t))
    try:
        return unet(x, torch.full((len(x),), t)).sample
    finally:
        if handle is not None:
            handle.remove()


def _hand_x_T(unet, images):
    """Upwards from the clean image at level 0: the step from level s calls the model at x_s with label s."""
    x = images * 2 - 1
    for s, t in zip(_LEVELS[:-1], _LEVELS[1:]):
        eps = _hand_eps(unet, x, s)
        x = _a(t) ** 0.5 * (x - (1 - _a(s)) ** 0.5 * eps) / _a(s) ** 0.5 + (1 - _a(t)) ** 0.5 * eps
    return x


@torch.no_grad()
def test_prepare_holds_x_T_and_the_unedited_trajectorys_predictions(tiny_clip_name):
    asyrp = _asyrp(tiny_clip_name)
    unet = asyrp.eps_model.unet
    images = _images()
    prepared = asyrp.prepare(images)
    x_T = _hand_x_T(unet, images)
    # the unedited DDIM trajectory from x_T, down through the edit timesteps: P_t(ε) at each
    x, predictions = x_T, []
    for t, t_next in [(999, 799), (799, 599), (599, 399)]:
        eps = _hand_eps(unet, x, t)
        predictions.append((x - (1 - _a(t)) ** 0.5 * eps) / _a(t) ** 0.5)
        x = _a(t_next) ** 0.5 * predictions[-1] + (1 - _a(t_next)) ** 0.5 * eps
    assert asyrp.edit_timesteps == [999, 799, 599]
    assert prepared.shape == (3, 4, 3, 16, 16)
    assert torch.allclose(prepared[:, 0], x_T, atol=1e-5)
    for k, expected in enumerate(predictions):
        # P_t at t = 999 divides by √ᾱ_999 ≈ 0.006 (a random UNet's predictions reach ~300): compare to the scale
        assert (prepared[:, 1 + k] - expected).abs().max() <= 1e-4 * expected.abs().max(), k
    assert torch.allclose(prepared[:, 0], ddim_invert(EpsModel(unet), images * 2 - 1, asyrp.schedule), atol=1e-6)


def test_training_walks_the_edited_trajectory_through_every_edit_timestep(tiny_clip_name):
    """Asyrp_official's run_training, written out: from x_T, at each t ≥ t_edit (descending) the loss of the edited
    prediction P_t(ε̃) at the *edited* state, the L1 target from the unedited trajectory at the same t, and the next
    edited state by the asymmetric step (P_t from ε̃, direction from ε). An L1 target or a state from the unedited
    inversion trajectory, or a single timestep, fails here."""
    import open_clip

    asyrp = _asyrp(tiny_clip_name, target_text="a photo of a damaged {class}", lambda_clip=0.7, lambda_l1=2.0)
    _set_edit(asyrp)
    images, categories = _images(), ["screw", "nut", "screw"]
    prepared = asyrp.prepare(images)
    unet, model = asyrp.eps_model.unet, asyrp.clip.encoder.model
    visited = []
    spy = unet.register_forward_pre_hook(lambda m, args: visited.append((int(args[1][0]), args[0].detach().clone())))
    with torch.no_grad():  # Δh is not updated between the steps here: the trajectory is the edited generation's
        steps = [(t, loss, parts) for t, loss, parts in asyrp.training_losses(images, prepared, categories)]
    spy.remove()
    assert [t for t, _, _ in steps] == [999, 799, 599] == [t for t, _ in visited]  # one batched (2B) pass per t

    mean = torch.tensor(model.visual.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.image_std).view(1, 3, 1, 1)

    def embed_images(x):
        x = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False).clamp(0, 1)
        f = model.encode_image((x - mean) / std)
        return f / f.norm(dim=-1, keepdim=True)

    with torch.no_grad():
        texts = model.encode_text(open_clip.get_tokenizer(tiny_clip_name)(
            [f"a photo of a damaged {c}" for c in categories]))
        texts = texts / texts.norm(dim=-1, keepdim=True)
        source = embed_images(images)
        x = x_plain = _hand_x_T(unet, images)
        for (t, loss, parts), (_, seen), t_next in zip(steps, visited, [799, 599, 399]):
            a, a_next = _a(t), _a(t_next)
            assert torch.allclose(seen[:3], x, atol=1e-3, rtol=1e-4), t  # the UNet ran at the edited state
            eps, eps_edited = _hand_eps(unet, x, t), _hand_eps(unet, x, t, asyrp.delta_h)
            x0_edited = (x - (1 - a) ** 0.5 * eps_edited) / a**0.5
            eps_plain = _hand_eps(unet, x_plain, t)
            x0_plain = (x_plain - (1 - a) ** 0.5 * eps_plain) / a**0.5
            edited = embed_images(((x0_edited + 1) / 2).clamp(0, 1))
            d_img, d_txt = edited - source, texts - source
            expected_clip = (1 - (d_img * d_txt).sum(-1) / (d_img.norm(dim=-1) * d_txt.norm(dim=-1))).mean()
            expected_l1 = (x0_edited - x0_plain).abs().mean()
            assert expected_l1 > 0  # the edit is not trivial
            assert torch.allclose(parts["clip"], expected_clip, atol=1e-4), t
            assert torch.allclose(parts["l1"], expected_l1, rtol=1e-3), t
            assert torch.allclose(loss, 0.7 * expected_clip + 2.0 * expected_l1, rtol=1e-3, atol=1e-4), t
            x = a_next**0.5 * x0_edited + (1 - a_next) ** 0.5 * eps  # the asymmetric step
            x_plain = a_next**0.5 * x0_plain + (1 - a_next) ** 0.5 * eps_plain
        assert (x - x_plain).abs().max() > 1e-3  # the two trajectories parted


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
    # the CLIP term alone: at Δh = 0 the L1 term grows at first order in every direction (|·| at 0)
    asyrp = _asyrp(tiny_clip_name, lambda_l1=0.0)
    asyrp.train()
    assert not asyrp.eps_model.training and not asyrp.clip.training  # frozen parts stay in eval mode
    frozen = {name: p.detach().clone() for name, p in asyrp.named_parameters() if not name.startswith("delta_h.")}
    assert frozen and not any(p.requires_grad for n, p in asyrp.named_parameters() if not n.startswith("delta_h."))
    images = _images(2)
    prepared = asyrp.prepare(images)
    optimizer = torch.optim.Adam(asyrp.delta_h.parameters(), lr=1e-2)

    def total_loss():  # the losses of one walk down the edited trajectory, Δh fixed
        with torch.no_grad():
            return sum(loss.item() for _, loss, _ in asyrp.training_losses(images, prepared))

    before = total_loss()
    for _ in range(3):
        for _, loss, _ in asyrp.training_losses(images, prepared):  # one optimizer step per edit timestep
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    after = total_loss()
    assert after < before - 0.1, (before, after)
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
