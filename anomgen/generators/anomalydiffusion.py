"""AnomalyDiffusion's generation core (METHODS.md §4): the spatial anomaly embedding, its masked training step and
blended generation, on a frozen text-to-image stack (:class:`anomgen.diffusion.text2image.TextToImageStack`: the LDM
txt2img-f8 of the paper, Stable Diffusion, or a tiny random one).

**Spatial anomaly embedding** (:class:`AnomalyEmbedding`): e = concat(e_a, e_s(m)), k + n token vectors of the text
encoder's width (1280 for LDM-BERT, 768 / 1024 for SD 1.x / 2.x).

- e_a: one row of k vectors per (object, defect type), k = 8 in the paper, 4 in the code; every vector starts at the
  token embedding of the word "anomaly" (the mean of its tokens' rows when the tokenizer splits it).
- e_s: :class:`MaskEncoder`, shared by all types, n = 4 vectors from the mask. The reference uses pSp's
  ``GradualStyleEncoder`` on an IR-50 backbone; this is a small encoder in its spirit:

  - input: the mask × 2 − 1 as one channel (the reference repeats it to 3 identical channels: the same function
    class);
  - backbone: a stem and 4 stride-2 stages of one IR unit each (reference: IR-50, 3 / 4 / 14 / 3 ``bottleneck_IR``
    units), widths ``channels`` (reference 64 / 128 / 256 / 512), GroupNorm instead of BatchNorm, PReLU;
  - features c1, c2, c3 at 1/4, 1/8, 1/16 of the resolution, as in the reference;
  - FPN: p2 = up(c3) + lat(c2), p1 = up(p2) + lat(c1), of c3's width, as in the reference;
  - heads: n of them, all reading p1, each stride-2 3×3 convs with LeakyReLU down to 1 × 1 (6 at 256 px, as in
    the reference) and an :class:`EqualLinear` to the token width; the convs are ``head_channels`` wide (default
    256; the reference: the token width, 1280).

  GroupNorm replaces BatchNorm so that a sample's tokens never depend on the other samples of its batch (in training
  mode BatchNorm would mix them, and generation promises per-sample results); no pretrained weights (neither has
  any). The heads are narrower by default (``head_channels`` 256 instead of the token width: the reference's heads
  alone hold about 330 M parameters at 1280); set ``head_channels`` to the width for the reference's size.

- The prompt: one of textual inversion's small templates (:data:`TEMPLATES_SMALL`, "a photo of a {}", ...) with
  "{}" replaced by the k + n vectors, start / end tokens added, padded and **truncated at the context length** (77)
  as the reference does (the short templates never reach it). The vectors are injected per sample through
  :func:`anomgen.encoders.clip_text.encode_with_embeddings` (CLIPTextModel and LDM-BERT alike): :func:`encode_spatial`.

**Training step** (:func:`anomaly_loss`): the masked diffusion loss ‖m ⊙ (ε − ε_θ(z_t, t, e))‖² on the latents, the
mask resized bilinearly to the latent grid and thresholded at 0.5, averaged over the mask area
(``mask_reduction="mask"``) or over the whole latent as the code does (``"latent"``). Masks that vanish on the latent
grid or cover all of it are refused, naming the samples. Optimise :meth:`AnomalyEmbedding.parameters` (every e_a
and the encoder jointly) with Adam, lr 5e-3 (:func:`anomaly_optimizer`; the code scales it by batch × devices).
:class:`AnomalyAugmentation`: flips, a rotation of up to 20° and a crop that keeps the anomaly's bounding box,
applied identically to image and mask, every draw from the given generator.

**Blended generation** (:func:`blended_generate`): DDIM (200 steps, η = 1, no guidance by default) from a normal
image z₀ and a mask; at the start of every step x_t ← x_t·m′ + q_sample(z₀, t)·(1 − m′) with fresh noise (m′ the
latent mask, dilated by the code form of AAR); optionally (``final_blend``, on by default, *not* in the code) a last
blend x₀ ← x₀·m + z₀·(1 − m), after which the latent outside the mask **is** the normal latent, bit for bit (in pixels
the VAE decoder still mixes across the edge). Adaptive attention re-weighting (:mod:`anomgen.diffusion.attention`,
``aar`` = off | paper | code) is installed on the UNet only while generating. Every random draw of sample i comes
from ``generators[i]``, so a sample does not depend on its batch.

Which mask the samples carry: the **input mask at image size** (binarised at 0.5), as the reference saves it. It is
the mask the embedding was conditioned on and trained to fill, at the resolution the localizer is trained and scored
at; the latent-grid mask is 8× coarser (blocky) and, like the input mask, only approximates the pixels that changed,
because the decoder spreads the edit over its receptive field. ``BlendedSamples.latent_masks`` keeps the latent one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from anomgen.diffusion.attention import (
    DILATION_FACTOR,
    AttentionReweighting,
    adaptive_attention,
    check_form,
    code_weight_map,
    dilate_mask,
    dilation_radius,
    paper_weight_map,
)
from anomgen.diffusion.text2image import (
    TextToImageStack,
    decode_latents,
    diffusion_loss,
    encode_latents,
    latent_mask,
)
from anomgen.encoders.clip_text import encode_with_embeddings, token_embeddings
from anomgen.pixels import resize

NAME = "anomalydiffusion"

#: textual inversion's ``imagenet_templates_small`` (rinongal/textual_inversion), "{}" standing for the anomaly
#: embedding. The reference extends the list with "an illustration of ..." / "a depiction of ..." variants; pass
#: them as ``templates`` to use them.
TEMPLATES_SMALL: tuple[str, ...] = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)
MASK_REDUCTIONS = ("mask", "latent")
#: the LDM sampler's DDIM, whatever the stack's scheduler config says: t = 1, 6, …, 996 for 200 steps (``leading``
#: spacing, offset 1), ᾱ₀ as the last step's previous ᾱ, x̂₀ not clipped
DDIM_SETTINGS = {"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}

Generators = torch.Generator | Sequence[torch.Generator]


@dataclass(frozen=True)
class AnomalyDiffusionConfig:
    """AnomalyDiffusion's settings, declared once, with the paper's and the code's values where they differ.

    - ``num_type_tokens`` k of e_a: 8 (paper), 4 (code); ``num_mask_tokens`` n of e_s: 4; ``init_word``: "anomaly".
    - ``lr``: 5e-3 (Adam; the code multiplies it by batch × devices: ``scale_lr``).
    - ``mask_reduction``: "mask" (mean over the mask area) or "latent" (mean over the whole latent, the code).
    - ``steps`` 200, ``eta`` 1, ``guidance_scale`` 1 (none); ``aar`` "off" (the code's default; it recommends
      "code" for texture defects) | "paper" | "code"; ``final_blend`` True (the code: False);
      ``dilation_factor`` 8 (the code's dilation radius int((t + 100) · 8 // 1000) with 200 steps).
    """

    num_type_tokens: int = 8
    num_mask_tokens: int = 4
    init_word: str = "anomaly"
    templates: tuple[str, ...] = TEMPLATES_SMALL
    lr: float = 5e-3
    scale_lr: bool = False
    mask_reduction: str = "mask"
    steps: int = 200
    eta: float = 1.0
    guidance_scale: float = 1.0
    aar: str = "off"
    final_blend: bool = True
    dilation_factor: int = DILATION_FACTOR

    def __post_init__(self) -> None:
        object.__setattr__(self, "templates", tuple(self.templates))
        if self.num_type_tokens < 1 or self.num_mask_tokens < 0:
            raise ValueError(f"anomalydiffusion: num_type_tokens must be >= 1 and num_mask_tokens >= 0, got "
                             f"{self.num_type_tokens}, {self.num_mask_tokens}")
        if self.mask_reduction not in MASK_REDUCTIONS:
            raise ValueError(f"anomalydiffusion: mask_reduction must be one of {MASK_REDUCTIONS}, got "
                             f"{self.mask_reduction!r}")
        check_form(self.aar)
        _check_steps(self.steps, self.eta)
        for template in self.templates:
            split_template(template)

    def generation_kwargs(self) -> dict:
        """The keyword arguments of :func:`blended_generate`."""
        return {"steps": self.steps, "eta": self.eta, "guidance_scale": self.guidance_scale, "aar": self.aar,
                "final_blend": self.final_blend, "dilation_factor": self.dilation_factor,
                "templates": self.templates}

    def loss_kwargs(self) -> dict:
        """The keyword arguments of :func:`anomaly_loss` (the augmentation is passed separately)."""
        return {"templates": self.templates, "mask_reduction": self.mask_reduction}


def _check_steps(steps: int, eta: float) -> None:
    if int(steps) < 1:
        raise ValueError(f"anomalydiffusion: steps must be >= 1, got {steps}")
    if eta < 0:
        raise ValueError(f"anomalydiffusion: eta must be >= 0, got {eta}")


# ---------------------------------------------------------------------------------------------------- the encoder


def _groups(channels: int, most: int = 8) -> int:
    return math.gcd(int(channels), most)


class EqualLinear(nn.Module):
    """StyleGAN2's / pSp's equalised-learning-rate linear layer: weights drawn from N(0, 1) / ``lr_mul`` and scaled
    at run time by ``lr_mul / √in`` (so Adam's steps act on a unit-scale parameter), bias zero-initialised."""

    def __init__(self, in_features: int, out_features: int, lr_mul: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features, in_features) / lr_mul)
        self.bias = nn.Parameter(torch.zeros(out_features))
        self.scale = lr_mul / math.sqrt(in_features)
        self.lr_mul = lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class _IRUnit(nn.Module):
    """An IR bottleneck unit (ArcFace's ``bottleneck_IR``) with GroupNorm: norm → 3×3 conv → PReLU → 3×3 conv of
    ``stride`` → norm, plus a shortcut (a strided 1×1 conv + norm when the width changes, else subsampling)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.GroupNorm(_groups(in_channels), in_channels),
            nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False),
            nn.PReLU(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, stride, 1, bias=False),
            nn.GroupNorm(_groups(out_channels), out_channels))
        if in_channels == out_channels:
            self.shortcut = nn.MaxPool2d(1, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                          nn.GroupNorm(_groups(out_channels), out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class _Head(nn.Module):
    """pSp's ``GradualStyleBlock``: stride-2 3×3 convs with LeakyReLU down to 1 × 1, then an :class:`EqualLinear`."""

    def __init__(self, in_channels: int, channels: int, out_features: int, size: int) -> None:
        super().__init__()
        layers, width = [], in_channels
        while True:
            layers += [nn.Conv2d(width, channels, 3, 2, 1), nn.LeakyReLU()]
            width, size = channels, (size + 1) // 2
            if size <= 1:
                break
        self.convs = nn.Sequential(*layers)
        self.channels = channels
        self.linear = EqualLinear(channels, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.convs(x).flatten(1))


class MaskEncoder(nn.Module):
    """e_s: a mask (B × H × W or B × 1 × H × W in [0, 1]) -> ``num_tokens`` token vectors (B × n × ``width``).

    A small pSp ``GradualStyleEncoder`` (see the module docstring for the differences): a stem and four stride-2 IR
    stages of widths ``channels`` (features c1, c2, c3 at 1/4, 1/8, 1/16 of ``resolution``), FPN laterals
    p2 = up(c3) + lat(c2), p1 = up(p2) + lat(c1), and ``num_tokens`` heads reading p1. Masks of another size than
    ``resolution`` are resized (bilinear, antialiased) first."""

    def __init__(self, width: int, num_tokens: int = 4, resolution: int = 256,
                 channels: Sequence[int] = (32, 64, 128, 256), head_channels: int = 256) -> None:
        super().__init__()
        channels = [int(c) for c in channels]
        if len(channels) != 4:
            raise ValueError(f"MaskEncoder: channels must give the widths of the 4 stages, got {channels}")
        if resolution % 16:
            raise ValueError(f"MaskEncoder: resolution must be a multiple of 16 (4 stride-2 stages), got {resolution}")
        self.width, self.num_tokens, self.resolution = int(width), int(num_tokens), int(resolution)
        self.stem = nn.Sequential(nn.Conv2d(1, channels[0], 3, 1, 1, bias=False),
                                  nn.GroupNorm(_groups(channels[0]), channels[0]), nn.PReLU(channels[0]))
        widths = [channels[0]] + channels
        self.stages = nn.ModuleList(_IRUnit(widths[i], widths[i + 1], 2) for i in range(4))
        top = channels[-1]
        self.lateral2 = nn.Conv2d(channels[2], top, 1)  # c2 -> p2
        self.lateral1 = nn.Conv2d(channels[1], top, 1)  # c1 -> p1
        self.heads = nn.ModuleList(_Head(top, int(head_channels), self.width, resolution // 4)
                                   for _ in range(self.num_tokens))

    @staticmethod
    def _upsample_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, size=y.shape[-2:], mode="bilinear", align_corners=True) + y

    def forward(self, masks: torch.Tensor) -> torch.Tensor:
        x = _mask_4d(masks, "MaskEncoder").float()
        if tuple(x.shape[-2:]) != (self.resolution, self.resolution):
            x = resize(x, (self.resolution, self.resolution))
        x = self.stem(x * 2 - 1)
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        _, c1, c2, c3 = features
        p2 = self._upsample_add(c3, self.lateral2(c2))
        p1 = self._upsample_add(p2, self.lateral1(c1))
        if not self.heads:
            return p1.new_zeros(p1.shape[0], 0, self.width)
        return torch.stack([head(p1) for head in self.heads], dim=1)


# ------------------------------------------------------------------------------------------------ the embedding


def word_embedding(stack: TextToImageStack, word: str) -> torch.Tensor:
    """The token embedding (d,) of ``word`` in the text encoder's table: the mean of its tokens' rows (one row when
    the tokenizer keeps it whole, as LDM's BERT does for "anomaly")."""
    ids = stack.tokenizer(word, add_special_tokens=False).input_ids
    if not ids:
        raise ValueError(f"initializer word {word!r} gives no tokens")
    table = stack.text_encoder.get_input_embeddings().weight.detach()
    return table[ids].float().mean(dim=0).cpu()


class AnomalyEmbedding(nn.Module):
    """e = concat(e_a, e_s(m)): ``num_types`` rows of ``num_type_tokens`` learned vectors (e_a, one row per
    (object, defect type)) and a :class:`MaskEncoder` of ``num_mask_tokens`` (e_s, shared by all types), all of the
    text encoder's ``width``. ``init``: e_a's starting vector(s), (d,) or (k, d), e.g. :func:`word_embedding` of
    "anomaly" (:meth:`from_stack` does that); default zeros. ``type_names`` optionally names the rows
    (:meth:`type_index`). Everything here is trained: ``parameters()`` is what the optimizer gets."""

    def __init__(self, num_types: int, width: int, num_type_tokens: int = 8, num_mask_tokens: int = 4,
                 init: torch.Tensor | None = None, resolution: int = 256,
                 encoder: dict | None = None, type_names: Sequence[str] | None = None) -> None:
        super().__init__()
        if int(num_types) < 1 or int(num_type_tokens) < 1:
            raise ValueError(f"AnomalyEmbedding: num_types and num_type_tokens must be >= 1, got {num_types}, "
                             f"{num_type_tokens}")
        self.num_types, self.width = int(num_types), int(width)
        self.num_type_tokens, self.num_mask_tokens = int(num_type_tokens), int(num_mask_tokens)
        start = torch.zeros(self.num_type_tokens, self.width) if init is None else torch.as_tensor(init).float()
        start = start[None] if start.dim() == 1 else start
        if start.dim() != 2 or start.shape[-1] != self.width or start.shape[0] not in (1, self.num_type_tokens):
            raise ValueError(f"AnomalyEmbedding: init must be ({self.width},) or ({self.num_type_tokens}, "
                             f"{self.width}), got {tuple(start.shape)}")
        rows = start.expand(self.num_type_tokens, self.width)
        self.type_tokens = nn.Parameter(rows[None].repeat(self.num_types, 1, 1).clone())
        self.mask_encoder = MaskEncoder(self.width, self.num_mask_tokens, resolution, **(encoder or {}))
        if type_names is not None:
            type_names = [str(n) for n in type_names]
            if len(type_names) != self.num_types or len(set(type_names)) != len(type_names):
                raise ValueError(f"AnomalyEmbedding: type_names must be {self.num_types} distinct names, got "
                                 f"{type_names}")
        self.type_names = type_names
        #: what a loaded file says about the embedding (:func:`load_anomaly_embedding`: category, stack ...)
        self.info: dict = {}

    @classmethod
    def from_stack(cls, stack: TextToImageStack, num_types: int, num_type_tokens: int = 8,
                   num_mask_tokens: int = 4, init_word: str = "anomaly", resolution: int | None = None,
                   encoder: dict | None = None, type_names: Sequence[str] | None = None) -> AnomalyEmbedding:
        """An embedding of the stack's text width, e_a starting at ``init_word``'s token embedding, the mask encoder
        at ``resolution`` (default: the stack's image size)."""
        return cls(num_types, stack.text_width, num_type_tokens, num_mask_tokens,
                   init=word_embedding(stack, init_word), resolution=resolution or stack.resolution,
                   encoder=encoder, type_names=type_names)

    @property
    def num_tokens(self) -> int:
        """k + n."""
        return self.num_type_tokens + self.num_mask_tokens

    def type_index(self, name: str) -> int:
        if self.type_names is None:
            raise KeyError("AnomalyEmbedding has no type_names")
        if name not in self.type_names:
            raise KeyError(f"unknown anomaly type {name!r}; known: {', '.join(self.type_names)}")
        return self.type_names.index(name)

    def tokens(self, type_ids: torch.Tensor | Sequence[int], masks: torch.Tensor) -> torch.Tensor:
        """B × (k + n) × d: the e_a rows of ``type_ids`` followed by the mask encoder's vectors of ``masks``."""
        masks = _mask_4d(masks, "AnomalyEmbedding.tokens")
        ids = torch.as_tensor(type_ids, dtype=torch.long, device=self.type_tokens.device).flatten()
        if ids.numel() != masks.shape[0]:
            raise ValueError(f"AnomalyEmbedding.tokens: {ids.numel()} type ids for {masks.shape[0]} masks")
        bad = ((ids < 0) | (ids >= self.num_types)).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"AnomalyEmbedding.tokens: type ids {ids[bad].tolist()} (samples {bad}) are not in "
                             f"[0, {self.num_types})")
        type_part = self.type_tokens[ids]
        mask_part = self.mask_encoder(masks.to(self.type_tokens.device))
        return torch.cat([type_part, mask_part.to(type_part.dtype)], dim=1)

    def forward(self, type_ids: torch.Tensor | Sequence[int], masks: torch.Tensor) -> torch.Tensor:
        return self.tokens(type_ids, masks)


def anomaly_optimizer(embedding: AnomalyEmbedding, lr: float = 5e-3, scale_lr: bool = False, batch_size: int = 1,
                      num_devices: int = 1) -> torch.optim.Adam:
    """Adam over every e_a row and the mask encoder jointly; with ``scale_lr`` the rate is multiplied by
    batch × devices as the reference does (5e-3 × 4 = 0.02 at batch 4 on one GPU). Rows of types absent from a batch
    get no gradient but, as in any joint Adam, still move with their running moments."""
    rate = float(lr) * (int(batch_size) * int(num_devices) if scale_lr else 1)
    return torch.optim.Adam(embedding.parameters(), lr=rate)


# ------------------------------------------------------------------------------------------------ prompts


def split_template(template: str) -> tuple[str, str]:
    """(before, after) the one "{}" of a template; a template without exactly one "{}" is an error."""
    if template.count("{}") != 1:
        raise ValueError(f"prompt template {template!r} must hold exactly one '{{}}' (where the embedding goes)")
    before, after = template.split("{}")
    return before.strip(), after.strip()


@dataclass
class SpatialPrompt:
    """Encoded prompts with the anomaly embedding in place: ``hidden_states`` B × L × d (the UNet's
    ``encoder_hidden_states``), ``input_ids`` B × L, ``columns`` B × L (bool): where the embedding's vectors sit (the
    columns AAR re-weights; the code also re-weights column 0, see :meth:`aar_columns`)."""

    hidden_states: torch.Tensor
    input_ids: torch.Tensor
    columns: torch.Tensor
    templates: list[str] = field(default_factory=list)

    def aar_columns(self, form: str) -> torch.Tensor:
        """The columns re-weighted by AAR ``form``: the embedding's (paper), plus column 0 (code)."""
        columns = self.columns.clone()
        if form == "code":
            columns[:, 0] = True
        return columns


def _special_ids(tokenizer) -> tuple[int, int, int]:
    """(start, end, pad) ids: what the tokenizer puts around an empty text (CLIP: 49406 / 49407; BERT: [CLS] / [SEP])
    and its padding id."""
    around = tokenizer("", add_special_tokens=True).input_ids
    if len(around) != 2:
        raise ValueError(f"the tokenizer puts {around} around an empty text; expected a start and an end token")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else around[1]
    return int(around[0]), int(around[1]), int(pad)


def spatial_input_ids(tokenizer, templates: Sequence[str], num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B × L, L = the tokenizer's ``model_max_length``) of ``templates`` with ``num_tokens`` slots in place
    of "{}" — start, the text before, the slots, the text after, end, padding — cut at L as the reference does; and
    the slots' positions (B × L bool). The slots carry the id of "*" (the reference's placeholder; their embeddings
    are replaced, so the id only shows in the ids)."""
    start, end, pad = _special_ids(tokenizer)
    star = tokenizer("*", add_special_tokens=False).input_ids
    slot = int(star[0]) if len(star) == 1 else pad
    length = int(tokenizer.model_max_length)
    rows, where = [], []
    for template in templates:
        before, after = split_template(template)
        head = tokenizer(before, add_special_tokens=False).input_ids if before else []
        tail = tokenizer(after, add_special_tokens=False).input_ids if after else []
        row = [start, *head, *([slot] * num_tokens), *tail, end]
        mark = [False] * (1 + len(head)) + [True] * num_tokens + [False] * (len(tail) + 1)
        row, mark = row[:length], mark[:length]
        rows.append(row + [pad] * (length - len(row)))
        where.append(mark + [False] * (length - len(mark)))
    return torch.tensor(rows, dtype=torch.long), torch.tensor(where, dtype=torch.bool)


def encode_spatial(stack: TextToImageStack, tokens: torch.Tensor, templates: Sequence[str]) -> SpatialPrompt:
    """The text encoder's hidden states of ``templates`` (one per sample) with "{}" replaced by the sample's
    ``tokens`` (B × m × d, e.g. :meth:`AnomalyEmbedding.tokens`), injected through
    :func:`~anomgen.encoders.clip_text.encode_with_embeddings`; gradients flow into ``tokens``. Slots cut off by the
    context length drop the vectors that fall beyond it."""
    if tokens.dim() != 3 or tokens.shape[0] != len(templates):
        raise ValueError(f"encode_spatial: tokens must be B × m × d for {len(templates)} templates, got "
                         f"{tuple(tokens.shape)}")
    if tokens.shape[-1] != stack.text_width:
        raise ValueError(f"encode_spatial: tokens of width {tokens.shape[-1]}; the text encoder takes "
                         f"{stack.text_width}")
    device = stack.device
    ids, columns = spatial_input_ids(stack.tokenizer, templates, tokens.shape[1])
    ids, columns = ids.to(device), columns.to(device)
    embeds = token_embeddings(stack.text_encoder, ids)
    vectors = tokens.to(device=device, dtype=embeds.dtype)
    rows = []
    for b in range(len(templates)):
        slots = columns[b].nonzero().flatten()
        if slots.numel() == 0:
            rows.append(embeds[b])
            continue
        first, count = int(slots[0]), int(slots.numel())
        rows.append(torch.cat([embeds[b, :first], vectors[b, :count], embeds[b, first + count:]]))
    hidden = encode_with_embeddings(stack.text_encoder, ids, torch.stack(rows))
    return SpatialPrompt(hidden, ids, columns, list(templates))


def draw_templates(templates: Sequence[str], generators: Generators | None, batch: int) -> list[str]:
    """One template per sample: from ``generators[i]`` (one draw each) or ``batch`` draws from one generator."""
    templates = list(templates)
    if not templates:
        raise ValueError("no prompt templates given")
    for template in templates:
        split_template(template)
    if generators is None or isinstance(generators, torch.Generator):
        picks = torch.randint(len(templates), (batch,), generator=generators).tolist()
    else:
        picks = [int(torch.randint(len(templates), (1,), generator=g)) for g in generators]
    return [templates[i] for i in picks]


# ------------------------------------------------------------------------------------------------ masks


def _mask_4d(masks: torch.Tensor, where: str) -> torch.Tensor:
    if masks.dim() == 3:
        masks = masks[:, None]
    if masks.dim() != 4 or masks.shape[1] != 1:
        raise ValueError(f"{where}: masks must be B × H × W or B × 1 × H × W, got shape {tuple(masks.shape)}")
    return masks


def binary_masks(masks: torch.Tensor) -> torch.Tensor:
    """Masks (B × H × W or B × 1 × H × W, bool or values in [0, 1]) as B × 1 × H × W float {0, 1}, thresholded at 0.5
    (as the reference reads its mask files)."""
    return (_mask_4d(masks, "masks").float() >= 0.5).float()


def mask_problems(masks: torch.Tensor, latent_size: tuple[int, int]) -> dict[int, str]:
    """Sample -> what is wrong with its mask on the latent grid ``latent_size`` (:func:`latent_mask`): ``"vanishes"``
    (nothing to learn or generate) or ``"covers"`` (the whole grid: no normal region left to keep). Good samples are
    absent."""
    latent = latent_mask(binary_masks(masks), tuple(latent_size))
    area = latent.flatten(1).sum(dim=1)
    cells = latent[0].numel()
    return {i: "vanishes" if a == 0 else "covers" for i, a in enumerate(area.tolist()) if a == 0 or a == cells}


def check_masks(masks: torch.Tensor, latent_size: tuple[int, int], where: str = "anomalydiffusion",
                names: Sequence[str] | None = None) -> torch.Tensor:
    """The masks on the latent grid (:func:`~anomgen.diffusion.text2image.latent_mask`, B × 1 × h × w); a sample whose
    mask vanishes there (nothing to learn or generate) or covers all of it (no normal region left to keep) is an
    error naming the samples (by ``names[i]``, e.g. the mask files, when given; else by position)."""
    latent = latent_mask(binary_masks(masks), tuple(latent_size))
    found = mask_problems(masks, latent_size)
    label = (lambda i: repr(str(names[i]))) if names is not None else str
    empty = [label(i) for i, why in found.items() if why == "vanishes"]
    full = [label(i) for i, why in found.items() if why == "covers"]
    problems = []
    if empty:
        problems.append(f"the masks of samples [{', '.join(empty)}] vanish on the {tuple(latent_size)} latent grid "
                        "(too small after resizing)")
    if full:
        problems.append(f"the masks of samples [{', '.join(full)}] cover the whole {tuple(latent_size)} latent grid "
                        "(no normal region left)")
    if problems:
        raise ValueError(f"{where}: " + "; ".join(problems) + ": reject those samples first")
    return latent


# ------------------------------------------------------------------------------------------------ augmentation


def keep_box_crop(mask: torch.Tensor, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """A random crop ``(top, left, h, w)`` of an H × W mask that keeps its bounding box (of pixels >= 0.5): top in
    {0 … first row}, bottom in {last row + 1 … H}, the same for the columns (4 draws, in that order). An empty mask
    gives the whole image (no draws)."""
    on = mask >= 0.5
    height, width = on.shape[-2:]
    rows, cols = on.any(dim=-1).nonzero().flatten(), on.any(dim=-2).nonzero().flatten()
    if rows.numel() == 0:
        return 0, 0, int(height), int(width)
    r1, r2, c1, c2 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    top = int(torch.randint(0, r1 + 1, (1,), generator=generator))
    bottom = int(torch.randint(r2 + 1, height + 1, (1,), generator=generator))
    left = int(torch.randint(0, c1 + 1, (1,), generator=generator))
    right = int(torch.randint(c2 + 1, width + 1, (1,), generator=generator))
    return top, left, bottom - top, right - left


@dataclass(frozen=True)
class AnomalyAugmentation:
    """The reference's training augmentation, applied identically to image and mask with probability ``p``: a
    vertical and a horizontal flip (``flip_p`` each), a rotation by an angle uniform in ``rotation`` degrees (the
    code: an integer in [0, 20]) about the centre, then a crop that keeps the anomaly's bounding box
    (:func:`keep_box_crop`), resized back to the input size.

    Differences from the code, which resizes to 512 first and 256 last: the work is done at the input size; the image
    is rotated bilinearly (the code: nearest), the mask nearest; the corners the rotation uncovers are filled with
    ``fill`` (0.5: the code rotates [−1, 1] images with fill 0, i.e. mid-grey) and 0 in the mask; the resized mask
    is thresholded at 0.5 (the code keeps it soft; the loss thresholds it on the latent grid anyway)."""

    p: float = 0.5
    flip_p: float = 0.5
    rotation: tuple[float, float] = (0.0, 20.0)
    crop: bool = True
    fill: float = 0.5

    def __call__(self, images: torch.Tensor, masks: torch.Tensor,
                 generator: Generators | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``images`` B × 3 × H × W in [0, 1], ``masks`` B × (1 ×) H × W -> (images, masks B × 1 × H × W {0, 1}).
        Sample i draws from ``generator[i]``, or all samples in turn from one generator: apply (1 uniform); if
        applied: vertical flip, horizontal flip, angle (3 uniforms), then the crop (:func:`keep_box_crop`)."""
        masks = binary_masks(masks)
        batch = images.shape[0]
        if masks.shape[0] != batch or masks.shape[-2:] != images.shape[-2:]:
            raise ValueError(f"AnomalyAugmentation: masks {tuple(masks.shape)} do not match images "
                             f"{tuple(images.shape)}")
        gens = list(generator) if generator is not None and not isinstance(generator, torch.Generator) \
            else [generator] * batch
        if len(gens) != batch:
            raise ValueError(f"AnomalyAugmentation: {len(gens)} generators for a batch of {batch}")
        out_images, out_masks = [], []
        for image, mask, g in zip(images, masks, gens):
            image, mask = self.one(image, mask, g)
            out_images.append(image)
            out_masks.append(mask)
        return torch.stack(out_images), torch.stack(out_masks)

    def one(self, image: torch.Tensor, mask: torch.Tensor,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One sample: ``image`` 3 × H × W, ``mask`` 1 × H × W {0, 1}."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        if float(torch.rand(1, generator=generator)) >= self.p:
            return image, mask
        vflip, hflip, u = torch.rand(3, generator=generator).tolist()
        if vflip < self.flip_p:
            image, mask = image.flip(-2), mask.flip(-2)
        if hflip < self.flip_p:
            image, mask = image.flip(-1), mask.flip(-1)
        angle = self.rotation[0] + u * (self.rotation[1] - self.rotation[0])
        if angle:
            image = TF.rotate(image, angle, interpolation=InterpolationMode.BILINEAR, fill=[float(self.fill)] * 3)
            mask = TF.rotate(mask, angle, interpolation=InterpolationMode.NEAREST, fill=[0.0])
        if self.crop:
            size = tuple(image.shape[-2:])
            top, left, h, w = keep_box_crop(mask[0], generator)
            if (h, w) != size:
                image = resize(image[None, :, top:top + h, left:left + w], size)[0]
                crop = mask[None, :, top:top + h, left:left + w]
                mask = (F.interpolate(crop, size=size, mode="bilinear", align_corners=False) >= 0.5).float()[0]
        return image, mask


def augment_or_keep(augmentation: AnomalyAugmentation, images: torch.Tensor, masks: torch.Tensor,
                    latent_size: tuple[int, int],
                    generator: Generators | None = None) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """``augmentation`` of a batch, except that a sample whose augmented mask vanishes on the latent grid or covers
    all of it (a crop that keeps exactly the box of a rectangular defect, a rotation that moves a thin one out) keeps
    its original image and mask (checked inputs stay valid). Returns (images, masks B × 1 × H × W, the samples kept
    unaugmented). The draws are the augmentation's, whatever is kept."""
    masks = binary_masks(masks)
    out_images, out_masks = augmentation(images, masks, generator)
    kept = sorted(mask_problems(out_masks, latent_size))
    if kept:
        out_images, out_masks = out_images.clone(), out_masks.clone()
        out_images[kept], out_masks[kept] = images[kept].to(out_images.dtype), masks[kept]
    return out_images, out_masks, kept


# ------------------------------------------------------------------------------------------------ training step


def anomaly_loss(stack: TextToImageStack, embedding: AnomalyEmbedding, images: torch.Tensor | None,
                 masks: torch.Tensor, type_ids: torch.Tensor | Sequence[int],
                 generator: torch.Generator | None = None, *, templates: Sequence[str] = TEMPLATES_SMALL,
                 mask_reduction: str = "mask", augmentation: AnomalyAugmentation | None = None,
                 latents: torch.Tensor | None = None) -> torch.Tensor:
    """The masked diffusion loss of one training step of the anomaly embedding.

    ``images`` B × 3 × H × W in [0, 1] (the anomalous training images), ``masks`` B × (1 ×) H × W (their defect
    masks, thresholded at 0.5), ``type_ids`` the e_a row of each sample. ``latents`` (scaled, B × C × h × w, e.g.
    from a :class:`~anomgen.diffusion.text2image.LatentCache`) replace encoding the images (then ``images`` may be
    None and there is no augmentation). Draws from ``generator`` in this order: the augmentation, the templates, the
    VAE posterior, the noise and the timesteps. Steps:

    1. ``augmentation`` of image and mask together (optional);
    2. masks checked on the latent grid (:func:`check_masks`: none may vanish or cover everything);
    3. z₀ from the frozen VAE (no gradient), e = ``embedding.tokens(type_ids, masks)``, prompts from ``templates``
       with e in place (:func:`encode_spatial`);
    4. :func:`~anomgen.diffusion.text2image.diffusion_loss` with the mask: ``mask_reduction`` "mask" (mean over the
       mask area) or "latent" (the code's mean over the whole latent).

    Gradients reach only ``embedding`` (the stack is frozen)."""
    if mask_reduction not in MASK_REDUCTIONS:
        raise ValueError(f"anomaly_loss: mask_reduction must be one of {MASK_REDUCTIONS}, got {mask_reduction!r}")
    masks = binary_masks(masks)
    if latents is None:
        if images is None:
            raise ValueError("anomaly_loss: give images or latents")
        if images.shape[0] != masks.shape[0] or images.shape[-2:] != masks.shape[-2:]:
            raise ValueError(f"anomaly_loss: masks {tuple(masks.shape)} do not match images {tuple(images.shape)}")
        if augmentation is not None:
            images, masks = augmentation(images, masks, generator)
    elif augmentation is not None:
        raise ValueError("anomaly_loss: augmentation needs the images, not cached latents")
    batch = masks.shape[0]
    if latents is not None and latents.shape[0] != batch:
        raise ValueError(f"anomaly_loss: {latents.shape[0]} latents for {batch} masks")
    size = tuple(latents.shape[-2:]) if latents is not None else (
        images.shape[-2] // stack.latent_factor, images.shape[-1] // stack.latent_factor)
    check_masks(masks, size, "anomaly_loss")
    chosen = draw_templates(templates, generator, batch)
    if latents is None:
        with torch.no_grad():
            latents = encode_latents(stack, images.to(stack.device), generator=generator)
    tokens = embedding.tokens(type_ids, masks)
    prompt = encode_spatial(stack, tokens, chosen)
    return diffusion_loss(stack, latents, prompt.hidden_states, mask=masks.to(latents.device), generator=generator,
                          mask_reduction=mask_reduction)


# ------------------------------------------------------------------------------------------------ generation


def _randn(shape: Sequence[int], generators: Sequence[torch.Generator], device: torch.device,
           dtype: torch.dtype) -> torch.Tensor:
    """Row i of standard normal noise from ``generators[i]`` (drawn on that generator's device, then moved)."""
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype).to(device)
                      for g in generators])


@dataclass
class BlendedSamples:
    """The result of :func:`blended_generate`, on the stack's device.

    - ``images``: B × 3 × H × W in [0, 1] (None with ``decode=False``);
    - ``masks``: B × H × W float {0, 1}: the input masks at image size, binarised (what a sample's mask is);
    - ``latents``: the final latents; ``normal_latents``: z₀; ``latent_masks``: B × 1 × h × w, the latent-grid masks;
    - ``templates``: the prompt template of each sample."""

    images: torch.Tensor | None
    masks: torch.Tensor
    latents: torch.Tensor
    normal_latents: torch.Tensor
    latent_masks: torch.Tensor
    templates: list[str]


@torch.no_grad()
def blended_generate(stack: TextToImageStack, embedding: AnomalyEmbedding, normal_images: torch.Tensor,
                     masks: torch.Tensor, type_ids: torch.Tensor | Sequence[int],
                     generators: Sequence[torch.Generator], *, steps: int = 200, eta: float = 1.0, aar: str = "off",
                     final_blend: bool = True, guidance_scale: float = 1.0,
                     templates: Sequence[str] = TEMPLATES_SMALL, dilation_factor: int = DILATION_FACTOR,
                     decode: bool = True) -> BlendedSamples:
    """Anomalies of type ``type_ids`` in the masks ``masks`` (B × (1 ×) H × W) of the normal images ``normal_images``
    (B × 3 × H × W in [0, 1]), one ``torch.Generator`` per sample.

    1. Sample i draws, from ``generators[i]`` only: its template, its VAE posterior noise (z₀), its starting noise
       x_T, then at every step the fresh q_sample noise and (η > 0) the DDIM noise.
    2. DDIM over ``steps`` steps of the stack's schedule (:data:`DDIM_SETTINGS`: t = 1, 6, …, 996 for 200 steps, the
       LDM sampler's; the last step's previous ᾱ is ᾱ₀; no clipping), η = ``eta``.
    3. At the start of each step: x_t ← x_t·m′ + q_sample(z₀, t)·(1 − m′), m′ the latent mask (dilated by
       :func:`~anomgen.diffusion.attention.dilation_radius` with ``aar="code"``).
    4. ``aar``: "code" re-weights with :func:`~anomgen.diffusion.attention.code_weight_map` of (m′, x_t, z₀);
       "paper" with :func:`~anomgen.diffusion.attention.paper_weight_map` of (m, z₀, x̂₀), x̂₀ the previous step's
       prediction (none at the first step, which runs unweighted).
    5. ``guidance_scale`` > 1: classifier-free guidance with the empty prompt (not re-weighted).
    6. ``final_blend``: x₀ ← x₀·m + z₀·(1 − m), so that the latent outside the mask is z₀ exactly.
    """
    check_form(aar)
    _check_steps(steps, eta)
    gens = list(generators)
    images = normal_images.to(stack.device)
    batch = images.shape[0]
    if len(gens) != batch:
        raise ValueError(f"blended_generate: {len(gens)} generators for a batch of {batch} (one per sample)")
    pixel_masks = binary_masks(masks)
    if pixel_masks.shape[0] != batch or pixel_masks.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"blended_generate: masks {tuple(pixel_masks.shape)} do not match images "
                         f"{tuple(images.shape)}")
    size = (images.shape[-2] // stack.latent_factor, images.shape[-1] // stack.latent_factor)
    m = check_masks(pixel_masks, size, "blended_generate").to(stack.device)
    chosen = draw_templates(templates, gens, batch)

    unet, device = stack.unet, stack.device
    z0 = encode_latents(stack, images, generator=gens)
    prompt = encode_spatial(stack, embedding.tokens(type_ids, pixel_masks.to(stack.device)), chosen)
    context = prompt.hidden_states.to(unet.dtype)
    guided = guidance_scale > 1.0
    if guided:
        context = torch.cat([stack.encode_prompts([""] * batch).to(unet.dtype), context])
    columns = prompt.aar_columns(aar) if aar != "off" else None
    if guided and columns is not None:
        columns = torch.cat([torch.zeros_like(columns), columns])

    scheduler = stack.sampling_scheduler("DDIMScheduler", **DDIM_SETTINGS)
    scheduler.set_timesteps(int(steps), device=device)
    noise_scheduler = stack.noise_scheduler
    latents = _randn(z0.shape, gens, device, z0.dtype)
    pred_original = None
    with adaptive_attention(unet, aar) as controller:
        for t in scheduler.timesteps:
            blend_mask = dilate_mask(m, dilation_radius(t, dilation_factor)) if aar == "code" else m
            fresh = _randn(z0.shape, gens, device, z0.dtype)
            noised = noise_scheduler.add_noise(z0, fresh, t.reshape(1).repeat(batch).to(device))
            latents = latents * blend_mask + noised * (1 - blend_mask)
            if controller is not None:
                weight = None
                if aar == "code":
                    weight = code_weight_map(blend_mask, latents, z0)
                elif pred_original is not None:
                    weight = paper_weight_map(m, z0, pred_original)
                if weight is not None and guided:
                    weight = torch.cat([weight, weight])
                controller.current = None if weight is None else AttentionReweighting(aar, weight, columns)
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            pred = unet(model_input.to(unet.dtype), t, encoder_hidden_states=context, return_dict=False)[0].float()
            if guided:
                uncond, cond = pred.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
            variance_noise = _randn(z0.shape, gens, device, z0.dtype) if eta > 0 else None
            latents, pred_original = scheduler.step(pred.to(latents.dtype), t, latents, eta=eta,
                                                    variance_noise=variance_noise, return_dict=False)
    if final_blend:
        latents = latents * m + z0 * (1 - m)
    out = decode_latents(stack, latents) if decode else None
    return BlendedSamples(images=out, masks=pixel_masks[:, 0], latents=latents, normal_latents=z0, latent_masks=m,
                          templates=chosen)


# ------------------------------------------------------------------------------------------------ the embedding file

EMBEDDING_FORMAT = "anomgen/anomalydiffusion-embedding/1"


def save_anomaly_embedding(path, embedding: AnomalyEmbedding, info: dict | None = None):
    """Write a trained :class:`AnomalyEmbedding` (every e_a row, the mask encoder, the type names, and what rebuilds
    it) to a safetensors file, atomically; ``info`` (JSON-serialisable: the category, the stack's source ...) is kept
    beside. :func:`load_anomaly_embedding` reads it back."""
    import json

    from safetensors.torch import save

    from anomgen.files import write_atomic

    if embedding.type_names is None:
        raise ValueError("save_anomaly_embedding: the embedding has no type_names (which row is which defect type)")
    encoder = embedding.mask_encoder
    head_channels = encoder.heads[0].channels if len(encoder.heads) else 256
    meta = {"format": EMBEDDING_FORMAT, "type_names": list(embedding.type_names),
            "num_type_tokens": embedding.num_type_tokens, "num_mask_tokens": embedding.num_mask_tokens,
            "width": embedding.width, "resolution": encoder.resolution,
            "encoder": {"channels": [int(stage.body[1].out_channels) for stage in encoder.stages],
                        "head_channels": int(head_channels)},
            "info": dict(info or {})}
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in embedding.state_dict().items()}
    return write_atomic(path, save(tensors, metadata={"anomgen": json.dumps(meta)}))


def read_file_info(path) -> dict:
    """The JSON metadata of an anomgen safetensors file (:func:`save_anomaly_embedding`, mask files)."""
    import json
    from pathlib import Path

    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with safe_open(str(path), "pt") as handle:
        meta = handle.metadata() or {}
    if "anomgen" not in meta:
        raise ValueError(f"{path} is no anomgen file (its safetensors metadata has no 'anomgen' entry)")
    return json.loads(meta["anomgen"])


def load_anomaly_embedding(path, width: int | None = None) -> AnomalyEmbedding:
    """The :class:`AnomalyEmbedding` of a file written by :func:`save_anomaly_embedding` (on the CPU, weights
    loaded strictly). With ``width`` (the text encoder's), an embedding of another width is an error naming both."""
    from safetensors.torch import load_file

    meta = read_file_info(path)
    if meta.get("format") != EMBEDDING_FORMAT:
        raise ValueError(f"{path} is not an AnomalyDiffusion embedding file (format {meta.get('format')!r}, expected "
                         f"{EMBEDDING_FORMAT!r})")
    if width is not None and int(width) != int(meta["width"]):
        raise ValueError(f"{path}: the embedding has width {meta['width']}; the text encoder expects {int(width)} (it "
                         "was learned in another text-to-image stack)")
    embedding = AnomalyEmbedding(len(meta["type_names"]), meta["width"], meta["num_type_tokens"],
                                 meta["num_mask_tokens"], resolution=meta["resolution"], encoder=meta["encoder"],
                                 type_names=meta["type_names"])
    embedding.load_state_dict(load_file(str(path)), strict=True)
    embedding.info = meta.get("info", {})
    return embedding
