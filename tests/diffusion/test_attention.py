"""Adaptive attention re-weighting: both weight maps against loops written from METHODS.md §4, one cross-attention
layer of a tiny UNet2DConditionModel computed by hand (paper: probabilities scaled; code: scaled logits scaled,
column 0 and the placeholder columns, the weight map resized to the layer's grid), ``off`` equal to diffusers'
AttnProcessor, and installation on the attn2 layers only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anomgen.diffusion.attention import (
    AdaptiveAttentionProcessor,
    AttentionReweighting,
    adaptive_attention,
    code_weight_map,
    cross_attention_keys,
    dilate_mask,
    dilation_radius,
    install_adaptive_attention,
    layer_grid,
    paper_weight_map,
    uninstall_adaptive_attention,
)

WIDTH = 16  # text width = cross-attention width
L = 6  # text tokens


@pytest.fixture(scope="module")
def unet():
    """Cross-attention at two grids: 8 × 8 and 4 × 4 latents' pixels."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32, 32),
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=WIDTH, attention_head_dim=4, norm_num_groups=8).eval()


def _masks() -> torch.Tensor:
    m = torch.zeros(3, 1, 8, 8)
    m[0, :, 2:5, 3:7] = 1
    m[1, :, 0:2, 0:3] = 1
    m[2, :, 4:8, 1:3] = 1
    return m


# ------------------------------------------------------------------------------------------------ weight maps


def _paper_by_hand(m, y, x0):
    """Eq. 7 with loops, float64: d = ‖m⊙y − m⊙x̂₀‖² per pixel, f = 1/d (−∞ at 0), w = ‖m‖₁ · softmax(f)."""
    batch, _, h, w = y.shape
    out = torch.zeros(batch, h, w, dtype=torch.float64)
    for b in range(batch):
        f = {}
        for i in range(h):
            for j in range(w):
                d = float(sum((m[b, 0, i, j] * y[b, c, i, j] - m[b, 0, i, j] * x0[b, c, i, j]) ** 2
                              for c in range(y.shape[1])))
                if d > 0:
                    f[i, j] = 1.0 / d
        area = float(m[b].sum())
        if not f:
            out[b] = m[b, 0].double()
            continue
        top = max(f.values())
        total = sum(torch.tensor(v - top, dtype=torch.float64).exp() for v in f.values())
        for (i, j), v in f.items():
            out[b, i, j] = area * torch.tensor(v - top, dtype=torch.float64).exp() / total
    return out


def _code_by_hand(m, xt, z0):
    """The reference's lines, float64: d = mean_c((m·(x_t − z₀))²); 0 → −1; v = m / d; w = Σm · v / Σv; w == 0 → 1;
    w < 1 → 1; w > 1.5 → 1.5; Σv == 0 → 1."""
    batch, channels, h, w = xt.shape
    out = torch.zeros(batch, h, w, dtype=torch.float64)
    for b in range(batch):
        v = torch.zeros(h, w, dtype=torch.float64)
        for i in range(h):
            for j in range(w):
                d = sum(float(m[b, 0, i, j] * (xt[b, c, i, j] - z0[b, c, i, j])) ** 2 for c in range(channels))
                d = d / channels
                d = -1.0 if d == 0 else d
                v[i, j] = float(m[b, 0, i, j]) / d
        total = float(v.sum())
        if total == 0:
            out[b] = 1.0
            continue
        for i in range(h):
            for j in range(w):
                x = float(m[b].sum()) * float(v[i, j]) / total
                x = 1.0 if x == 0 else x
                x = 1.0 if x < 1 else x
                out[b, i, j] = 1.5 if x > 1.5 else x
    return out


def test_paper_weight_map_is_eq7():
    torch.manual_seed(1)
    m = _masks()
    y = torch.randn(3, 4, 8, 8)
    x0 = y + 0.3 * torch.randn(3, 4, 8, 8)
    x0[0, :, 3, 4] = y[0, :, 3, 4]  # a masked pixel already equal to the normal one: f = −∞, weight 0
    x0[2] = y[2]  # nothing to favour: the mask itself
    w = paper_weight_map(m, y, x0)
    hand = _paper_by_hand(m, y, x0)
    assert w.shape == (3, 8, 8) and w.dtype == torch.float32
    assert (w.double() - hand).abs().max() < 1e-5
    assert w[0, 3, 4] == 0 and (w * (1 - m[:, 0]) == 0).all()  # nothing outside the mask
    assert torch.allclose(w.flatten(1).sum(1), m.flatten(1).sum(1))  # sums to ‖m‖₁
    assert torch.equal(w[2], m[2, 0])


def test_code_weight_map_is_the_reference_lines():
    torch.manual_seed(2)
    m = dilate_mask(_masks(), 1)
    z0 = torch.randn(3, 4, 8, 8)
    xt = z0 + torch.randn(3, 4, 8, 8) * torch.rand(3, 1, 8, 8)
    xt[0, :, 3, 4] = z0[0, :, 3, 4]  # d = 0 inside the mask: −1
    xt[2] = z0[2]  # Σv = −‖m‖₁ ≠ 0: every weight clamps to 1
    w = code_weight_map(m, xt, z0)
    hand = _code_by_hand(m, xt, z0)
    assert w.shape == (3, 8, 8) and (w.double() - hand).abs().max() < 1e-5
    assert w.min() >= 1 and w.max() <= 1.5 and (w[0] > 1).any()
    assert (w[:, 0, 0][m[:, 0, 0, 0] == 0] == 1).all()
    # a sample whose dilated mask is empty (Σv = 0) gets 1 everywhere
    assert torch.equal(code_weight_map(torch.zeros(1, 1, 8, 8), xt[:1], z0[:1]), torch.ones(1, 8, 8))


def test_dilation_is_a_square_max_filter_of_the_reference_radius():
    assert [dilation_radius(t) for t in (996, 901, 400, 150, 24, 1)] == [8, 8, 4, 2, 0, 0]
    assert dilation_radius(996, factor=16) == 17  # the reference's 50-step variant
    m = _masks()
    for radius in (0, 1, 2):
        d = dilate_mask(m, radius)
        for b in range(3):
            for i in range(8):
                for j in range(8):
                    window = m[b, 0, max(0, i - radius):i + radius + 1, max(0, j - radius):j + radius + 1]
                    assert d[b, 0, i, j] == window.max()
    assert dilate_mask(m[:, 0], 1).shape == (3, 8, 8)


def test_layer_grid_halves_like_strided_convolutions():
    assert layer_grid((8, 8), 64) == (8, 8) and layer_grid((8, 8), 16) == (4, 4)
    assert layer_grid((5, 7), 12) == (3, 4) and layer_grid((5, 7), 4) == (2, 2)
    with pytest.raises(ValueError, match="no halving"):
        layer_grid((8, 8), 20)


# ------------------------------------------------------------------------------------------------ the processor


def _attn(unet, level: int = 1):
    """The cross-attention layer of the given down block (0: 8 × 8 queries, 1: 4 × 4)."""
    return unet.down_blocks[level].attentions[0].transformer_blocks[0].attn2


def _by_hand(attn, hidden, context, weight, columns, form):
    """One cross-attention layer written out: projections, heads, scale · QKᵀ, the re-weighting, softmax, V, out."""
    batch, n, _ = hidden.shape
    heads = attn.heads
    q, k, v = hidden @ attn.to_q.weight.T, context @ attn.to_k.weight.T, context @ attn.to_v.weight.T
    dh = q.shape[-1] // heads
    q, k, v = (x.view(batch, -1, heads, dh).transpose(1, 2) for x in (q, k, v))  # B × H × · × dh
    logits = q @ k.transpose(-1, -2) * dh ** -0.5  # B × H × N × L
    side = int(n ** 0.5)
    factor = weight.shape[-1] // side
    w = F.avg_pool2d(weight[:, None], factor)[:, 0].reshape(batch, n) if factor > 1 else weight.reshape(batch, n)
    grid = torch.ones(batch, n, context.shape[1])
    for b in range(batch):
        for j in range(context.shape[1]):
            if columns[b, j]:
                grid[b, :, j] = w[b]
    if form == "code":
        logits = logits * grid[:, None]
    probs = logits.softmax(dim=-1)
    if form == "paper":
        probs = probs * grid[:, None]
    out = (probs @ v).transpose(1, 2).reshape(batch, n, heads * dh)
    return out @ attn.to_out[0].weight.T + attn.to_out[0].bias


@pytest.mark.parametrize("form", ["paper", "code"])
@pytest.mark.parametrize("level", [0, 1])
def test_one_cross_attention_layer_equals_the_hand_computation(unet, form, level):
    """Weights on the 8 × 8 latent grid; the layer of level 1 sees them resized to 4 × 4 (bilinear 2× down = the
    mean of 2 × 2 blocks)."""
    torch.manual_seed(3)
    attn = _attn(unet, level)
    n = 64 // 4 ** level
    hidden = torch.randn(3, n, attn.to_q.in_features)
    context = torch.randn(3, L, WIDTH)
    weight = 1 + 0.5 * torch.rand(3, 8, 8) if form == "code" else 3 * torch.rand(3, 8, 8)
    columns = torch.zeros(3, L, dtype=torch.bool)
    columns[:, 2:5] = True  # the placeholder tokens
    if form == "code":
        columns[:, 0] = True
    columns[2] = False  # a sample left alone (e.g. the unconditional half of a guided batch)
    reweighting = AttentionReweighting(form, weight, columns)
    attn.set_processor(AdaptiveAttentionProcessor())
    with torch.no_grad():
        got = attn(hidden, encoder_hidden_states=context, reweighting=reweighting)
        hand = _by_hand(attn, hidden, context, weight, columns, form)
        plain = _by_hand(attn, hidden, context, weight, torch.zeros_like(columns), form)
    err = (got - hand).abs().max().item()
    print(f"{form} level {level}: max |processor - hand| = {err:.2e}")
    assert err < 1e-5
    assert (got[:2] - plain[:2]).abs().max() > 1e-3  # the re-weighting did something
    assert (got[2] - plain[2]).abs().max() < 1e-5


def test_off_is_diffusers_attn_processor(unet):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    torch.manual_seed(4)
    attn = _attn(unet, 0)
    hidden, context = torch.randn(2, 64, attn.to_q.in_features), torch.randn(2, L, WIDTH)
    outs = {}
    with torch.no_grad():
        for name, processor in (("ours", AdaptiveAttentionProcessor()), ("plain", AttnProcessor()),
                                ("sdpa", AttnProcessor2_0())):
            attn.set_processor(processor)
            outs[name] = attn(hidden, encoder_hidden_states=context)
        # the whole UNet: installed but with nothing to re-weight
        sample, t, text = torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.randn(2, L, WIDTH)
        unet.set_attn_processor(AttnProcessor())
        reference = unet(sample, t, text).sample
        with adaptive_attention(unet, "code") as controller:
            assert controller.current is None
            installed = unet(sample, t, text).sample
            # weight 1 everywhere: the same attention in both forms
            ones = torch.ones(2, 8, 8)
            for form in ("paper", "code"):
                controller.current = AttentionReweighting(form, ones, torch.ones(2, L, dtype=torch.bool))
                assert torch.equal(unet(sample, t, text).sample, reference)
            controller.current = AttentionReweighting("code", ones * 1.5, torch.ones(2, L, dtype=torch.bool))
            assert (unet(sample, t, text).sample - reference).abs().max() > 1e-4
    assert torch.equal(outs["ours"], outs["plain"])
    assert (outs["ours"] - outs["sdpa"]).abs().max() < 1e-5
    assert torch.equal(installed, reference)


def test_installed_on_cross_attention_only_and_removed(unet):
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    before = dict(unet.attn_processors)
    keys = cross_attention_keys(unet)
    assert keys and all(k.endswith("attn2.processor") for k in keys) and len(keys) == len(before) // 2
    controller = install_adaptive_attention(unet)
    during = unet.attn_processors
    for key, processor in during.items():
        if key in keys:
            assert isinstance(processor, AdaptiveAttentionProcessor) and processor.controller is controller
        else:
            assert processor is before[key]
    with pytest.raises(RuntimeError, match="already installed"):
        install_adaptive_attention(unet)
    uninstall_adaptive_attention(unet, controller)
    assert all(unet.attn_processors[k] is v for k, v in before.items())
    with pytest.raises(ZeroDivisionError), adaptive_attention(unet, "paper"):
        raise ZeroDivisionError  # restored on error too
    assert all(unet.attn_processors[k] is v for k, v in before.items())
    with adaptive_attention(unet, "off") as nothing:
        assert nothing is None and all(unet.attn_processors[k] is v for k, v in before.items())
    with pytest.raises(ValueError, match="form"):
        with adaptive_attention(unet, "both"):
            pass
