"""Adaptive attention re-weighting (AAR) of AnomalyDiffusion (METHODS.md §4) as a diffusers attention processor.

During blended generation, AAR strengthens the anomaly embedding's cross-attention inside the mask where the
generated content is still close to the normal image, so that small masks get filled. Two forms, which differ:

``paper`` (Eq. 7)
    From the predicted clean latent x̂₀ and the normal latent y (both on the latent grid) and the mask m:
    d = ‖m⊙y − m⊙x̂₀‖² per pixel (squared norm over the channels), w_m = ‖m‖₁ · softmax(f(d)) over the pixels, with
    f(x) = 1/x and f(0) = −∞ (so pixels outside the mask, and pixels where x̂₀ equals y, get weight 0). w_m
    multiplies the cross-attention *probabilities* (after the softmax) of the embedding tokens' columns; rows are not
    renormalised. :func:`paper_weight_map`. When d vanishes on the whole mask (no pixel to favour), w_m is the mask
    itself (weight 1 inside: the uniform softmax times ‖m‖₁).

``code`` (sjtuplayer/anomalydiffusion, ``--adaptive_mask``)
    From the noisy latent x_t and the clean normal latent z₀ and the *dilated* mask m′ (:func:`dilate_mask` by
    radius :func:`dilation_radius` = int((t + 100) · 8 // 1000)): d = mean_c((m′ · (x_t − z₀))²), zeros → −1, then
    v = m′ / d and w = ‖m′‖₁ · v / Σv, clamped to [1, 1.5] (a sample whose Σv is 0 gets 1 everywhere).
    w multiplies the *scaled pre-softmax logits* (scale · QKᵀ) of column 0 (the start / CLS token) and of the
    placeholder columns. :func:`code_weight_map`.

In both forms the weight map lives on the latent grid and is resized bilinearly (no antialiasing, as
torchvision 0.13's ``Resize`` of a tensor did in the reference) to each cross-attention layer's grid.

The processor (:class:`AdaptiveAttentionProcessor`) computes QKᵀ itself: diffusers' ``attention_mask`` is *added* to
the logits, so a multiplicative re-weighting cannot be expressed through it. It is installed on the cross-attention
layers only (``...attn2.processor`` keys) by :func:`install_adaptive_attention` (or the :func:`adaptive_attention`
context manager), which returns an :class:`AdaptiveAttention` controller: set its ``current`` re-weighting
(:class:`AttentionReweighting`) before each UNet call. Self-attention layers keep their processors. The re-weighting
can also be passed per call as the keyword ``reweighting`` (``cross_attention_kwargs`` reach every processor, so
that path makes diffusers warn about the self-attention layers that do not take it; the controller does not).
Without a re-weighting the processor computes exactly what diffusers' ``AttnProcessor`` computes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

FORMS = ("off", "paper", "code")
#: the reference's dilation: radius int((t + 100) · factor // 1000) latent pixels; factor 8 for its 200-step sampler
#: (16 when it samples with 50 steps)
DILATION_FACTOR = 8
#: the code form's clamp of the weights
CODE_CLAMP = (1.0, 1.5)


def check_form(form: str) -> str:
    if form not in FORMS:
        raise ValueError(f"adaptive attention re-weighting form must be one of {FORMS}, got {form!r}")
    return form


# ------------------------------------------------------------------------------------------------- weight maps


def _latent_mask(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """B × 1 × h × w float of a B × h × w or B × 1 × h × w mask."""
    if mask.dim() == 3:
        mask = mask[:, None]
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"{name} must be B × h × w or B × 1 × h × w on the latent grid, got {tuple(mask.shape)}")
    return mask.float()


def dilation_radius(timestep: int | torch.Tensor, factor: int = DILATION_FACTOR) -> int:
    """The reference's dilation radius at ``timestep``: int((t + 100) · factor // 1000) (8 at t = 999, 0 below
    t = 25 with factor 8)."""
    return int((int(timestep) + 100) * int(factor) // 1000)


def dilate_mask(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """The mask (B × 1 × h × w or B × h × w, {0, 1}) dilated by a (2r + 1)² square: a max-pool of stride 1 with the
    border padded by −∞ (the reference's ``Dilation2d``). Same shape as given."""
    if radius < 0:
        raise ValueError(f"dilation radius must be >= 0, got {radius}")
    squeeze = mask.dim() == 3
    m = _latent_mask(mask)
    if radius > 0:
        m = F.max_pool2d(m, kernel_size=2 * radius + 1, stride=1, padding=radius)
    return m[:, 0] if squeeze else m


def paper_weight_map(mask: torch.Tensor, normal_latents: torch.Tensor, pred_original: torch.Tensor) -> torch.Tensor:
    """Eq. 7 of the paper: w_m = ‖m‖₁ · softmax(f(‖m⊙y − m⊙x̂₀‖²)) per sample, f(x) = 1/x, f(0) = −∞.

    ``mask`` B × (1 ×) h × w in {0, 1} on the latent grid; ``normal_latents`` y and ``pred_original`` x̂₀ B × C × h × w.
    Returns B × h × w (float32): 0 outside the mask and wherever x̂₀ = y, summing to ‖m‖₁ per sample. A sample whose
    distance is 0 over its whole mask gets the mask itself (weight 1 inside)."""
    m = _latent_mask(mask)
    if normal_latents.shape != pred_original.shape or normal_latents.shape[0] != m.shape[0] \
            or normal_latents.shape[-2:] != m.shape[-2:]:
        raise ValueError(f"paper_weight_map: mask {tuple(m.shape)}, normal latents {tuple(normal_latents.shape)} and "
                         f"predicted latents {tuple(pred_original.shape)} must share batch and grid")
    y, x0 = normal_latents.float(), pred_original.float()
    distance = (m * y - m * x0).square().sum(dim=1)  # B × h × w
    logits = torch.where(distance > 0, 1.0 / distance.clamp_min(torch.finfo(torch.float32).tiny),
                         torch.full_like(distance, float("-inf")))
    flat = logits.flatten(1)
    none = torch.isinf(flat).all(dim=1)  # every logit −∞: the softmax is undefined
    probs = torch.softmax(torch.where(none[:, None], torch.zeros_like(flat), flat), dim=1).view_as(distance)
    area = m.flatten(1).sum(dim=1)
    weight = area[:, None, None] * probs
    return torch.where(none[:, None, None], m[:, 0], weight)


def code_weight_map(mask: torch.Tensor, noisy_latents: torch.Tensor, normal_latents: torch.Tensor,
                    clamp: tuple[float, float] = CODE_CLAMP) -> torch.Tensor:
    """The reference code's weight map: d = mean_c((m′ · (x_t − z₀))²), zeros → −1, v = m′ / d,
    w = ‖m′‖₁ · v / Σv clamped to ``clamp`` ([1, 1.5]); a sample with Σv = 0 gets 1 everywhere.

    ``mask`` m′ (already dilated: :func:`dilate_mask`) B × (1 ×) h × w on the latent grid; ``noisy_latents`` x_t and
    ``normal_latents`` z₀ B × C × h × w. Returns B × h × w (float32) in [1, 1.5]. Since the clamp sends every value
    below 1 to 1, pixels outside the mask (v = 0) and masked pixels where x_t = z₀ (v = −1) get 1."""
    m = _latent_mask(mask)
    if noisy_latents.shape != normal_latents.shape or noisy_latents.shape[0] != m.shape[0] \
            or noisy_latents.shape[-2:] != m.shape[-2:]:
        raise ValueError(f"code_weight_map: mask {tuple(m.shape)}, noisy latents {tuple(noisy_latents.shape)} and "
                         f"normal latents {tuple(normal_latents.shape)} must share batch and grid")
    low, high = float(clamp[0]), float(clamp[1])
    distance = (m * (noisy_latents.float() - normal_latents.float())).square().mean(dim=1)  # B × h × w
    distance = torch.where(distance == 0, torch.full_like(distance, -1.0), distance)
    inverse = m[:, 0] / distance
    total = inverse.flatten(1).sum(dim=1)
    area = m.flatten(1).sum(dim=1)
    safe = torch.where(total == 0, torch.ones_like(total), total)
    weight = (area / safe)[:, None, None] * inverse
    weight = weight.clamp(low, high)
    return torch.where((total == 0)[:, None, None], torch.ones_like(weight), weight)


# ------------------------------------------------------------------------------------------------- the processor


@dataclass
class AttentionReweighting:
    """What one UNet call re-weights: ``form`` ("paper" | "code"), ``weight`` B × h × w on the latent grid
    (:func:`paper_weight_map` / :func:`code_weight_map`) and ``columns`` B × L (bool): the text positions whose
    attention is re-weighted (paper: the embedding tokens; code: column 0 and the placeholder tokens). A sample whose
    ``columns`` row is all False is left alone (e.g. the unconditional half of a guided batch)."""

    form: str
    weight: torch.Tensor
    columns: torch.Tensor

    def __post_init__(self) -> None:
        if self.form not in ("paper", "code"):
            raise ValueError(f"AttentionReweighting.form must be 'paper' or 'code', got {self.form!r}")
        if self.weight.dim() != 3:
            raise ValueError(f"AttentionReweighting.weight must be B × h × w, got {tuple(self.weight.shape)}")
        if self.columns.dim() != 2 or self.columns.shape[0] != self.weight.shape[0]:
            raise ValueError(f"AttentionReweighting.columns must be B × L with B = {self.weight.shape[0]}, got "
                             f"{tuple(self.columns.shape)}")
        self.columns = self.columns.bool()


def layer_grid(latent_size: tuple[int, int], sequence_length: int) -> tuple[int, int]:
    """The grid (h', w') of an attention layer whose queries are ``sequence_length`` pixels of a UNet over a latent of
    ``latent_size``: the latent halved (rounding up, as stride-2 convolutions do) until the pixel counts match."""
    h, w = int(latent_size[0]), int(latent_size[1])
    while h * w > sequence_length:
        h, w = (h + 1) // 2, (w + 1) // 2
    if h * w != sequence_length:
        raise ValueError(f"an attention layer of {sequence_length} queries is no halving of the {latent_size} latent")
    return h, w


def resize_weight(weight: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The weight map (B × h × w) on ``grid``: bilinear without antialiasing (the reference's torchvision 0.13
    ``Resize`` of a tensor)."""
    if tuple(weight.shape[-2:]) == tuple(grid):
        return weight
    return F.interpolate(weight[:, None].float(), size=tuple(grid), mode="bilinear", align_corners=False,
                         antialias=False)[:, 0]


def column_weights(reweighting: AttentionReweighting, grid: tuple[int, int], heads: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """The multiplier (B·heads × N × L) of an attention map with N = h'·w' queries: the weight map on the layer's
    grid in the re-weighted columns, 1 elsewhere. Batch-major like ``Attention.head_to_batch_dim``."""
    weight = resize_weight(reweighting.weight, grid).flatten(1)  # B × N
    columns = reweighting.columns.to(weight.device)
    full = torch.where(columns[:, None, :], weight[:, :, None], torch.ones((), device=weight.device))  # B × N × L
    return full.repeat_interleave(heads, dim=0).to(dtype)


class AdaptiveAttention:
    """The controller shared by the processors that :func:`install_adaptive_attention` put on a UNet: set
    ``current`` (an :class:`AttentionReweighting`, or None for plain attention) before a UNet call. ``previous``
    holds the processors it replaced (restored by :func:`uninstall_adaptive_attention`)."""

    def __init__(self) -> None:
        self.current: AttentionReweighting | None = None
        self.previous: dict | None = None
        self.keys: list[str] = []


class AdaptiveAttentionProcessor:
    """A cross-attention processor that computes the attention map itself and applies an
    :class:`AttentionReweighting`: the ``reweighting`` keyword of the call, else the controller's ``current``, else
    none (then the output is diffusers' ``AttnProcessor``'s). ``code``: the scaled logits of the chosen columns are
    multiplied by the weight before the softmax (any ``attention_mask`` is added after); ``paper``: the
    probabilities of the chosen columns are multiplied after the softmax."""

    def __init__(self, controller: AdaptiveAttention | None = None) -> None:
        self.controller = controller

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 reweighting: AttentionReweighting | None = None) -> torch.Tensor:
        if reweighting is None and self.controller is not None:
            reweighting = self.controller.current
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        grid = None
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            grid = (height, width)
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (hidden_states.shape if encoder_hidden_states is None
                                          else encoder_hidden_states.shape)
        queries = hidden_states.shape[1]
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)

        multiplier = None
        if reweighting is not None:
            if reweighting.weight.shape[0] != batch_size or reweighting.columns.shape[1] != key.shape[1]:
                raise ValueError(f"attention re-weighting for {reweighting.weight.shape[0]} samples × "
                                 f"{reweighting.columns.shape[1]} columns; the layer has {batch_size} samples × "
                                 f"{key.shape[1]} text tokens")
            if grid is None:
                grid = layer_grid(tuple(reweighting.weight.shape[-2:]), queries)
            multiplier = column_weights(reweighting, grid, attn.heads, torch.float32)
        probs = _attention_probs(attn, query, key, attention_mask, reweighting, multiplier)
        hidden_states = torch.bmm(probs, value)
        hidden_states = attn.batch_to_head_dim(hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _attention_probs(attn, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
                     reweighting: AttentionReweighting | None, multiplier: torch.Tensor | None) -> torch.Tensor:
    """``Attention.get_attention_scores`` written out, with the code form's multiplier on the scaled logits (before
    the mask is added) and the paper form's on the probabilities."""
    if reweighting is None:
        return attn.get_attention_scores(query, key, attention_mask)
    dtype = query.dtype
    if attn.upcast_attention:
        query, key = query.float(), key.float()
    scores = torch.baddbmm(torch.empty(query.shape[0], query.shape[1], key.shape[1], dtype=query.dtype,
                                       device=query.device), query, key.transpose(-1, -2), beta=0, alpha=attn.scale)
    if reweighting.form == "code":
        scores = (scores.float() * multiplier).to(scores.dtype)
    if attention_mask is not None:
        scores = scores + attention_mask
    if attn.upcast_softmax:
        scores = scores.float()
    probs = scores.softmax(dim=-1)
    if reweighting.form == "paper":
        probs = probs.float() * multiplier
    return probs.to(dtype)


# ------------------------------------------------------------------------------------------------- install


def cross_attention_keys(unet) -> list[str]:
    """The processor keys of the UNet's cross-attention layers (``...attn2.processor``)."""
    return [key for key in unet.attn_processors if key.endswith("attn2.processor")]


def install_adaptive_attention(unet, controller: AdaptiveAttention | None = None) -> AdaptiveAttention:
    """Put an :class:`AdaptiveAttentionProcessor` on every cross-attention layer (attn2) of ``unet``
    (``set_attn_processor`` with every other layer's processor kept); returns the controller (new unless given), which
    remembers the replaced processors. A UNet without cross-attention layers is an error."""
    current = dict(unet.attn_processors)
    keys = cross_attention_keys(unet)
    if not keys:
        raise ValueError("install_adaptive_attention: the UNet has no cross-attention (attn2) layers")
    if any(isinstance(current[k], AdaptiveAttentionProcessor) for k in keys):
        raise RuntimeError("install_adaptive_attention: adaptive attention is already installed on this UNet")
    controller = controller if controller is not None else AdaptiveAttention()
    controller.previous = current
    controller.keys = keys
    processor = AdaptiveAttentionProcessor(controller)
    unet.set_attn_processor({k: (processor if k in keys else v) for k, v in current.items()})
    return controller


def uninstall_adaptive_attention(unet, controller: AdaptiveAttention) -> None:
    """Restore the processors ``controller`` replaced."""
    if controller.previous is None:
        raise RuntimeError("uninstall_adaptive_attention: this controller was never installed")
    previous: Mapping = controller.previous
    unet.set_attn_processor(dict(previous))
    controller.previous, controller.current = None, None


@contextmanager
def adaptive_attention(unet, form: str = "code") -> Iterator[AdaptiveAttention | None]:
    """Within the block, ``unet``'s cross-attention layers run :class:`AdaptiveAttentionProcessor` (yields the
    controller); the previous processors come back afterwards, also on error. ``form="off"`` installs nothing and
    yields None."""
    if check_form(form) == "off":
        yield None
        return
    controller = install_adaptive_attention(unet)
    try:
        yield controller
    finally:
        uninstall_adaptive_attention(unet, controller)
