"""DiffStyle: plain DDIM at γ = 0, h mixed only at t ≥ t_edit, one inversion per image, reconstruction on a trained
tiny model, the request plan, and the LightningModule's export."""

from __future__ import annotations

import pytest
import torch

from anomgen.diffusion.ddim import ddim_generate
from anomgen.diffusion.sde import tiny_score_unet
from anomgen.generators.diffstyle import DiffStyle, DiffStylePlan
from anomgen.seeding import sample_generator

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return tiny_score_unet("vp", image_size=8, channels=3).eval()


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_gamma_zero_without_boost_is_plain_ddim_from_the_style_latent(unet):
    ds = DiffStyle(unet, num_inference_steps=10, t_edit=400, t_boost=-1, gamma=0.0)
    styles, contents = ds.invert(_images(2, 1), keep_h=False), ds.invert(_images(2, 2))
    out = ds.generate(styles, contents)
    x_T = torch.stack([s.x_T for s in styles])
    plain = ((ddim_generate(ds.eps, x_T, ds.schedule) + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(out, plain, atol=1e-4, rtol=1e-4)
    mixed = DiffStyle(unet, num_inference_steps=10, t_edit=400, t_boost=-1, gamma=0.7).generate(styles, contents)
    assert (mixed - out).abs().max() > 1e-3  # γ > 0 changes the image


def test_content_h_is_kept_only_at_edit_timesteps_and_mixing_uses_it(unet):
    ds = DiffStyle(unet, num_inference_steps=10, t_edit=500, t_boost=-1, gamma=1.0)
    (content,) = ds.invert(_images(1, 3))
    (style,) = ds.invert(_images(1, 4), keep_h=False)
    assert sorted(content.h) == [t for t in sorted(ds.schedule.timesteps) if t >= 500] and not style.h
    before = ds.eps.evaluations
    ds.generate([style], [content])
    n_edit = len(content.h)
    assert ds.eps.evaluations - before == 10 + n_edit  # one extra (edited) pass per edit timestep, none below
    with pytest.raises(ValueError, match="lack h"):
        DiffStyle(unet, num_inference_steps=10, t_edit=300, t_boost=-1).generate([style], [content])
    ds.close()


def test_cross_product_inverts_each_image_once(unet):
    steps, n_style, n_content = 10, 3, 2
    ds = DiffStyle(unet, num_inference_steps=steps, t_edit=400, t_boost=200)
    out = list(ds.cross_product(_images(n_style, 5), _images(n_content, 6), seed=0, batch_size=4))
    indices = [i for idx, _ in out for i in idx]
    assert indices == list(range(n_style * n_content))
    n_edit = sum(t >= 400 for t in ds.schedule.timesteps)
    # n − 1 calls per inversion (none at the top level), plus one at x_T for each content image's top h
    inversions = (n_style + n_content) * (steps - 1) + n_content
    generations = n_style * n_content * (steps + n_edit)  # one extra (batched) pass per edit step
    assert ds.eps.evaluations == inversions + generations
    # seeded by global index: a sample does not depend on the batch it was made in
    again = dict(zip(*[sum((list(x) for x in part), []) for part in zip(*ds.cross_product(
        _images(n_style, 5), _images(n_content, 6), seed=0, batch_size=5))]))
    first = dict(zip(indices, [im for _, ims in out for im in ims]))
    for i in indices:
        torch.testing.assert_close(again[i], first[i], atol=1e-4, rtol=1e-4)


def test_inversion_then_generation_reconstructs_on_a_trained_model():
    from anomgen.data import Digits
    from anomgen.diffusion.ddpm import train_ddpm

    torch.manual_seed(0)
    digits = Digits(split="train")
    images = torch.stack([digits[i]["image"] for i in range(300)])
    trained, losses = train_ddpm(tiny_score_unet("vp", image_size=8, channels=3), images, steps=300, batch_size=64,
                                 lr=2e-3, ema_decay=0.9, progress=False)
    assert sum(losses[-30:]) / 30 < sum(losses[:30]) / 30
    ds = DiffStyle(trained, num_inference_steps=50, t_edit=400, t_boost=-1, gamma=0.0)
    x = images[:6]
    recon = ds.generate(ds.invert(x, keep_h=False), ds.invert(x))
    error = (recon - x).pow(2).mean().item()
    spread = (x - x.roll(1, dims=0)).pow(2).mean().item()  # distance between different digits
    assert error < 0.05 * spread, (error, spread)


def test_plan_partitions_the_support_and_errors_when_too_small():
    from anomgen.data import Digits
    from anomgen.data.tasks import normal_class

    support = normal_class(Digits(split="train"), "3")
    plan = DiffStylePlan(support, 3, 2, n_held_out=4, seed=1)
    assert len(plan) == 3 * 2 + 4
    assert plan[0] == {"index": 0, "style": 0, "content": 0, "held_out": -1}
    assert plan[5] == {"index": 5, "style": 2, "content": 1, "held_out": -1}
    assert plan[6] == {"index": 6, "style": -1, "content": -1, "held_out": 0}
    assert plan.anomaly_fields(5) == {"category": "3", "sources": [plan.style[2]["image_path"],
                                                                   plan.content[1]["image_path"]]}
    paths = [{r["image_path"] for r in part} for part in (plan.style, plan.content, plan.held_out, plan.unused)]
    assert sum(map(len, paths)) == len(support) and not set.intersection(*paths[:3])
    with pytest.raises(ValueError, match="needs 6"):
        DiffStylePlan(torch.utils.data.Subset(support, range(5)), 3, 2, n_held_out=1)


def _export(tmp_path, name, batch_size):
    from lightning.pytorch import Trainer

    from anomgen.data import Digits
    from callbacks.export import SyntheticSetExport
    from datamodules.anomaly import AnomalyDataModule
    from models.diffstyle import DiffStyleModel

    torch.manual_seed(0)
    unet = tiny_score_unet("vp", image_size=8, channels=3)
    model = DiffStyleModel(unet, n_style=2, n_content=3, n_held_out=2, num_inference_steps=8, t_edit=300,
                           t_boost=100)
    dm = AnomalyDataModule(Digits, normal_class="3", eval_batch_size=batch_size)
    export = SyntheticSetExport(str(tmp_path / name))
    Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
            callbacks=[export]).predict(model, datamodule=dm, return_predictions=False)
    return export.dirpath, model


def test_model_exports_a_validation_set_independent_of_batching(tmp_path):
    from anomgen.data.synthetic import SyntheticSet

    a, model = _export(tmp_path, "a", batch_size=4)
    b, _ = _export(tmp_path, "b", batch_size=3)
    set_a, set_b = SyntheticSet(a), SyntheticSet(b)
    assert [r["label"] for r in set_a.rows] == [1] * 6 + [0] * 2
    assert set_a.rows == set_b.rows
    first = set_a.rows[0]
    assert first["params"]["gamma"] == 0.7 and first["params"]["t_edit"] == 300 and len(first["sources"]) == 2
    for i in range(len(set_a)):
        assert (set_a[i]["image"] - set_b[i]["image"]).abs().max() <= 1 / 255 + 1e-6
    # each style / content image was inverted once: 2 styles + 3 contents
    assert len(model._inversions) == 5
    # held-out normals pass through unchanged (up to 8-bit PNG rounding)
    normal = set_a[6]
    source = model.plan.held_out[0]["image"]
    assert (normal["image"] - source).abs().max() <= 1 / 255 + 1e-6
    assert sample_generator(0, 1).initial_seed() != sample_generator(0, 2).initial_seed()


def test_config_declares_the_paper_defaults_once(unet):
    from anomgen.generators.diffstyle import DiffStyleConfig
    from models.diffstyle import DiffStyleModel

    config = DiffStyleConfig()
    assert (config.num_inference_steps, config.t_edit, config.t_boost, config.gamma, config.mix) == (
        50, 400, 200, 0.7, "lerp")
    ds = DiffStyle(unet, config, t_edit=300)  # keyword arguments override the config's fields
    assert ds.config == DiffStyleConfig(t_edit=300) and ds.t_edit == 300 and ds.gamma == 0.7
    assert DiffStyleModel(unet, gamma=0.5).generator.config == DiffStyleConfig(gamma=0.5)
    for bad, pattern in (({"mix": "max"}, "mix"), ({"gamma": 1.5}, "gamma"), ({"t_boost": 500}, "t_boost")):
        with pytest.raises(ValueError, match=pattern):
            DiffStyleConfig(**bad)
    with pytest.raises(TypeError, match="gama"):
        DiffStyleModel(unet, gama=0.5)


def test_predict_requests_is_pure_and_the_model_plans_in_setup(unet):
    from types import SimpleNamespace

    from anomgen.data import Digits
    from anomgen.data.tasks import normal_class
    from models.diffstyle import DiffStyleModel

    support = normal_class(Digits(split="train"), "3")
    model = DiffStyleModel(unet, n_style=2, n_content=3, n_held_out=2, num_inference_steps=8, t_edit=300,
                           t_boost=100)
    requests = model.predict_requests(support)
    assert model.plan is None and len(requests) == 2 * 3 + 2  # nothing set on the model
    with pytest.raises(RuntimeError, match="setup"):
        model.predict_step({"index": torch.tensor([0])}, 0)
    model.trainer = SimpleNamespace(datamodule=SimpleNamespace(support=support))
    model.setup("predict")
    assert [model.plan[i] for i in range(len(requests))] == [requests[i] for i in range(len(requests))]
    assert [e.image_path for e in model.plan.style.entries] == [e.image_path for e in requests.style.entries]


# --- the edited generation, step by step, by hand -------------------------------------------------------------------
# Written out from METHODS.md §1 without the code under test (no DDIMSchedule, ddim_step, HSpace, mix_h or
# edited_generation): the ᾱ table from the linear betas, the references' timesteps (Asyrp_official / InjectFusion:
# int(s + 1e-6) of linspace(0, 1, n) · 999, here written out as a list), h read and replaced by a hook of the test's
# own, and each update formula spelled out.

_HAND_ALPHA_BAR = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
_HAND_TIMESTEPS = [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]  # 10 steps, generation order


def _hand_alpha_bar(t: int) -> float:
    return 1.0 if t < 0 else float(_HAND_ALPHA_BAR[t])


class _GaussianPriorUNet(torch.nn.Module):
    """ε(x, t) = √(1 − ᾱ_t) x + 0.1 · tiny_unet(x, t): the exact ε of data ~ N(0, I) plus a small random UNet, so
    that the trajectory stays in the pixel range (a bare random UNet sends x far out and [0, 1] clamps nearly every
    pixel). It exposes the tiny UNet's ``mid_block``, so h is that block's output."""

    def __init__(self, unet) -> None:
        super().__init__()
        self.unet, self.mid_block = unet, unet.mid_block

    def forward(self, x, timestep):
        scale = (1.0 - _HAND_ALPHA_BAR[timestep]).sqrt().to(x.dtype).view(-1, 1, 1, 1)
        return scale * x + 0.1 * self.unet(x, timestep).sample


def _hand_eps(model, x, t, replace_h=None):
    """ε(x, t); with ``replace_h`` (h -> h'), the mid-block output is replaced by ``replace_h(h)``."""
    def hook(module, args, output):
        return None if replace_h is None else replace_h(output)

    handle = model.mid_block.register_forward_hook(hook)
    try:
        return model(x, torch.full((x.shape[0],), t, dtype=torch.long))
    finally:
        handle.remove()


def _hand_mix(h_s, h_c, gamma, mode):
    if mode == "lerp":
        return (1 - gamma) * h_s + gamma * h_c
    out = []
    for s, c in zip(h_s, h_c):  # per sample: content h rescaled to the style h's norm, then slerp
        s, c = s.flatten().double(), c.flatten().double()
        c = c * s.norm() / c.norm()
        omega = torch.arccos(torch.dot(s, c) / (s.norm() * c.norm()))
        mixed = (torch.sin((1 - gamma) * omega) * s + torch.sin(gamma * omega) * c) / torch.sin(omega)
        out.append(mixed.float().view(h_s.shape[1:]))
    return torch.stack(out)


@pytest.mark.parametrize("mode", ["lerp", "slerp"])
def test_generation_matches_the_hand_computed_asymmetric_steps(unet, mode):
    """10 DDIM steps (timesteps 999, 888, ..., 111, 0), t_edit = 700, t_boost = 250, γ = 0.7:
    - t = 999, 888, 777 (three edited steps): ε̃ with h ← mix(h_own, h_content[t]), ε with the UNet's own h;
      x_next = √ᾱ_next · (x_t − √(1 − ᾱ_t) ε̃)/√ᾱ_t + √(1 − ᾱ_next) · ε;
    - t = 666 ... 333: plain DDIM (η = 0, ε everywhere);
    - t = 222, 111: η = 1, σ = √((1 − ᾱ_next)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_next), noise z from each sample's generator;
    - t = 0: the last step, to ᾱ = 1 (σ = 0, no draw).
    The content h differs at every edit timestep, so that one timestep's h used everywhere shows; the symmetric step
    (direction from ε̃) shows too."""
    from anomgen.generators.diffstyle import Inversion

    model = _GaussianPriorUNet(unet)
    gamma, t_edit, t_boost = 0.7, 700, 250
    ds = DiffStyle(model, num_inference_steps=10, t_edit=t_edit, t_boost=t_boost, gamma=gamma, mix=mode)
    timesteps = _HAND_TIMESTEPS
    assert ds.schedule.timesteps == timesteps
    g = torch.Generator().manual_seed(123)
    x_T = torch.randn(2, 3, 8, 8, generator=g)
    h_content = {t: 3.0 * torch.randn(2, 32, 4, 4, generator=g) for t in (999, 888, 777)}
    styles = [Inversion(x_T[i]) for i in range(2)]
    contents = [Inversion(torch.zeros(3, 8, 8), {t: h[i] for t, h in h_content.items()}) for i in range(2)]
    seeds = (11, 12)
    out = ds.generate(styles, contents, [torch.Generator().manual_seed(s) for s in seeds])
    ds.close()

    hand_generators = [torch.Generator().manual_seed(s) for s in seeds]
    x = x_T.clone()
    with torch.no_grad():
        for t, t_next in zip(timesteps, [*timesteps[1:], -1]):
            a, a_next = _hand_alpha_bar(t), _hand_alpha_bar(t_next)
            eps = _hand_eps(model, x, t)
            if t >= t_edit:
                eps_tilde = _hand_eps(model, x, t, lambda h, t=t: _hand_mix(h, h_content[t], gamma, mode))
                p_t = (x - (1 - a) ** 0.5 * eps_tilde) / a**0.5  # predicted x0 from the edited ε̃
                x = a_next**0.5 * p_t + (1 - a_next) ** 0.5 * eps  # the direction from the unedited ε
                continue
            p_t = (x - (1 - a) ** 0.5 * eps) / a**0.5
            sigma = ((1 - a_next) / (1 - a)) ** 0.5 * (1 - a / a_next) ** 0.5 if t <= t_boost and t_next >= 0 else 0
            x_next = a_next**0.5 * p_t + (1 - a_next - sigma**2) ** 0.5 * eps
            if sigma > 0:
                x_next = x_next + sigma * torch.stack([torch.randn(3, 8, 8, generator=gen) for gen in hand_generators])
            x = x_next
    expected = ((x + 1) / 2).clamp(0, 1)
    inside = (expected > 0) & (expected < 1)
    assert inside.float().mean() > 0.6  # most pixels are compared unclamped
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


def test_content_h_is_read_at_its_own_level_with_that_levels_label(unet):
    """InjectFusion's convention, written out: the content image is inverted from level 0 up with ε(x_s, s), and the
    h kept for timestep t is the mid-block output of the call at (x_t, t), the content's state at level t with the
    label t (for the top level, one call at (x_T, 999)); generation at label t injects that h. A convention that
    read h at (x_{t−Δ}, t), the state one level below, fails here."""
    model = _GaussianPriorUNet(unet)
    ds = DiffStyle(model, num_inference_steps=10, t_edit=700, t_boost=-1)
    images = _images(2, 8)
    (first, second) = ds.invert(images)
    ds.close()

    levels = _HAND_TIMESTEPS[::-1]
    x, hand_h = images * 2 - 1, {}
    with torch.no_grad():
        for s, t in zip(levels[:-1], levels[1:]):
            seen = {}
            eps = _hand_eps(model, x, s, lambda h: seen.setdefault("h", h.clone()))
            hand_h[s] = seen["h"]
            a_s, a_t = _hand_alpha_bar(s), _hand_alpha_bar(t)
            x = a_t**0.5 * (x - (1 - a_s) ** 0.5 * eps) / a_s**0.5 + (1 - a_t) ** 0.5 * eps
        seen = {}
        _hand_eps(model, x, 999, lambda h: seen.setdefault("h", h.clone()))
        hand_h[999] = seen["h"]
    assert sorted(first.h) == [777, 888, 999]
    for i, inversion in enumerate((first, second)):
        torch.testing.assert_close(inversion.x_T, x[i], atol=1e-5, rtol=1e-5)
        for t in (999, 888, 777):
            torch.testing.assert_close(inversion.h[t], hand_h[t][i], atol=1e-5, rtol=1e-5)
