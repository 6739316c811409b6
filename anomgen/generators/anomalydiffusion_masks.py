"""AnomalyDiffusion's mask generator (METHODS.md §4, "Masks"): a mask embedding per defect type, learned by plain
textual inversion on that type's training masks, and a sampler that turns it into binary masks.

**The model** (:class:`MaskEmbedding`): per defect type, ``num_vectors`` token vectors of the text encoder's width
(16 in the code, 4 in the paper's §4.1, 2 in its supplement), all starting at the token embedding of "crack". They
stand where "{}" is in textual inversion's small templates ("a photo of a {}", ...), injected per sample through
:func:`~anomgen.generators.anomalydiffusion.encode_spatial`: the same computation as textual inversion's placeholder
tokens (only those vectors are free, the stack is frozen), without adding a token per type to the tokenizer, so that
the types of a category train side by side in one run (each type's vectors receive gradients only from its own
masks). Saved as one safetensors file in diffusers' textual-inversion layout (``{"<mask:TYPE>": tensor(n, d)}``,
:func:`~anomgen.encoders.clip_text.load_concepts` reads it) with the type names and category as metadata.

**Training** (:func:`mask_loss`): the masks as RGB images (the mask repeated to 3 channels, [0, 1]) at the stack's
resolution, a horizontal flip with probability ``flip_p`` (textual inversion's dataset), the plain denoising loss of
the frozen stack prompted with the type's vectors. AdamW, lr 0.02 (the code's rate; weight decay 1e-2 as textual
inversion's AdamW, *(check)*); the code runs 30k steps per type.

**Sampling** (:func:`sample_masks`): DDIM (100 steps, η = 1, the LDM sampler's timesteps), classifier-free guidance 5
with the empty prompt as the unconditional one, decoded; the mask is the decoded image's channel mean **> 0.8** on
[−1, 1]. A mask is rejected (:func:`mask_rejection`) when it is empty, when any border row or column (the outermost
ones, as the code checks them) has more than ``border_fraction`` (1/3) of its pixels set, or (given ``latent_size``)
when it would vanish on the generator's latent grid. A sample tries again from its own generator; after
``max_tries`` rejections it is a :class:`MaskGenerationError` naming the defect type and the count (the code loops
until it has enough masks, without a limit). Each sample is drawn alone (batch of one), from ``generators[i]`` only,
so that its mask, which is thresholded, never depends on the batch it falls in: the same mask on 1 or N devices.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from anomgen.diffusion.text2image import TextToImageStack, decode_latents, diffusion_loss, encode_latents, latent_mask
from anomgen.generators.anomalydiffusion import (
    DDIM_SETTINGS,
    TEMPLATES_SMALL,
    binary_masks,
    draw_templates,
    encode_spatial,
    read_file_info,
    word_embedding,
)
from anomgen.pixels import to_diffusion_range

NAME = "anomalydiffusion_masks"
MASKS_FORMAT = "anomgen/anomalydiffusion-masks/1"


class MaskGenerationError(ValueError):
    """No acceptable mask after the allowed number of tries."""


@dataclass(frozen=True)
class MaskGenerationConfig:
    """The mask generator's settings, declared once (paper vs code where they differ).

    - ``num_vectors`` per type: 16 (code), 4 (paper §4.1), 2 (paper's supplement); ``init_word`` "crack".
    - ``lr`` 0.02 (code), ``weight_decay`` 1e-2 (textual inversion's AdamW, *(check)*), ``flip_p`` 0.5 (textual
      inversion's horizontal flip, *(check)*: the mask dataset's augmentation is not in the released code).
    - ``steps`` 100, ``eta`` 1, ``guidance_scale`` 5 (empty prompt), ``threshold`` 0.8 on the [−1, 1] channel mean,
      ``border_fraction`` 1/3, ``max_tries`` per mask (ours: the code has no limit).
    """

    num_vectors: int = 16
    init_word: str = "crack"
    templates: tuple[str, ...] = TEMPLATES_SMALL
    lr: float = 0.02
    weight_decay: float = 1e-2
    flip_p: float = 0.5
    steps: int = 100
    eta: float = 1.0
    guidance_scale: float = 5.0
    threshold: float = 0.8
    border_fraction: float = 1 / 3
    max_tries: int = 100

    def __post_init__(self) -> None:
        object.__setattr__(self, "templates", tuple(self.templates))
        if self.num_vectors < 1:
            raise ValueError(f"mask generation: num_vectors must be >= 1, got {self.num_vectors}")
        if self.steps < 1 or self.eta < 0:
            raise ValueError(f"mask generation: steps must be >= 1 and eta >= 0, got {self.steps}, {self.eta}")
        if self.max_tries < 1:
            raise ValueError(f"mask generation: max_tries must be >= 1, got {self.max_tries}")
        if not 0.0 < self.border_fraction <= 1.0:
            raise ValueError(f"mask generation: border_fraction must be in (0, 1], got {self.border_fraction}")

    def sampling_kwargs(self) -> dict:
        """The keyword arguments of :func:`sample_masks` (besides ``latent_size``)."""
        return {"steps": self.steps, "eta": self.eta, "guidance_scale": self.guidance_scale,
                "threshold": self.threshold, "border_fraction": self.border_fraction, "max_tries": self.max_tries,
                "templates": self.templates}


# ---------------------------------------------------------------------------------------------------- the model


def mask_placeholder(defect_type: str) -> str:
    """The name of a type's vectors in the mask file (diffusers' token key): ``<mask:TYPE>``."""
    return f"<mask:{defect_type}>"


class MaskEmbedding(nn.Module):
    """``num_vectors`` learned token vectors per defect type (``type_names``), of the text encoder's ``width``:
    ``vectors`` (T × n × d), all starting at ``init`` ((d,) or (n, d); default zeros). Everything here is trained."""

    def __init__(self, type_names: Sequence[str], width: int, num_vectors: int = 16,
                 init: torch.Tensor | None = None) -> None:
        super().__init__()
        names = [str(t) for t in type_names]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"MaskEmbedding: type_names must be distinct and at least one, got {names}")
        self.type_names, self.width, self.num_vectors = names, int(width), int(num_vectors)
        start = torch.zeros(self.num_vectors, self.width) if init is None else torch.as_tensor(init).float()
        start = start[None] if start.dim() == 1 else start
        if start.dim() != 2 or start.shape[-1] != self.width or start.shape[0] not in (1, self.num_vectors):
            raise ValueError(f"MaskEmbedding: init must be ({self.width},) or ({self.num_vectors}, {self.width}), "
                             f"got {tuple(start.shape)}")
        rows = start.expand(self.num_vectors, self.width)
        self.vectors = nn.Parameter(rows[None].repeat(len(names), 1, 1).clone())
        #: what a loaded file says (category, stack ...)
        self.info: dict = {}

    @classmethod
    def from_stack(cls, stack: TextToImageStack, type_names: Sequence[str], num_vectors: int = 16,
                   init_word: str = "crack") -> MaskEmbedding:
        """Vectors of the stack's text width, each starting at ``init_word``'s token embedding."""
        return cls(type_names, stack.text_width, num_vectors, init=word_embedding(stack, init_word))

    def type_index(self, name: str) -> int:
        if name not in self.type_names:
            raise KeyError(f"the mask model has no defect type {name!r}; it has {', '.join(self.type_names)}")
        return self.type_names.index(name)

    def tokens(self, type_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """B × n × d: the vectors of each sample's type."""
        ids = torch.as_tensor(type_ids, dtype=torch.long, device=self.vectors.device).flatten()
        bad = ((ids < 0) | (ids >= len(self.type_names))).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"MaskEmbedding.tokens: type ids {ids[bad].tolist()} are not in "
                             f"[0, {len(self.type_names)})")
        return self.vectors[ids]


def mask_optimizer(embedding: MaskEmbedding, lr: float = 0.02, weight_decay: float = 1e-2) -> torch.optim.AdamW:
    """AdamW over the types' vectors (textual inversion's optimizer at the mask model's rate). A type absent from a
    batch gets a zero gradient; as in any joint Adam, its running moments still move it a little."""
    return torch.optim.AdamW(embedding.parameters(), lr=float(lr), weight_decay=float(weight_decay))


def save_mask_embedding(path: str | Path, embedding: MaskEmbedding, info: dict | None = None) -> Path:
    """One safetensors file, diffusers' textual-inversion layout (``{"<mask:TYPE>": tensor(n, d)}``), atomically;
    the type order, the width and ``info`` (category, stack ...) as metadata."""
    from safetensors.torch import save

    from anomgen.files import write_atomic

    tensors = {mask_placeholder(t): embedding.vectors[i].detach().to("cpu", torch.float32).contiguous()
               for i, t in enumerate(embedding.type_names)}
    meta = {"format": MASKS_FORMAT, "type_names": list(embedding.type_names), "width": embedding.width,
            "num_vectors": embedding.num_vectors, "info": dict(info or {})}
    return write_atomic(path, save(tensors, metadata={"anomgen": json.dumps(meta)}))


def load_mask_embedding(path: str | Path, width: int | None = None) -> MaskEmbedding:
    """The :class:`MaskEmbedding` of a file of :func:`save_mask_embedding` (CPU). With ``width`` (the text
    encoder's), a file of another width is an error naming both."""
    from safetensors.torch import load_file

    meta = read_file_info(path)
    if meta.get("format") != MASKS_FORMAT:
        raise ValueError(f"{path} is not an AnomalyDiffusion mask file (format {meta.get('format')!r}, expected "
                         f"{MASKS_FORMAT!r})")
    if width is not None and int(width) != int(meta["width"]):
        raise ValueError(f"{path}: the mask vectors have width {meta['width']}; the text encoder expects {int(width)} "
                         "(they were learned in another text-to-image stack)")
    tensors = load_file(str(path))
    embedding = MaskEmbedding(meta["type_names"], meta["width"], meta["num_vectors"])
    with torch.no_grad():
        for i, name in enumerate(embedding.type_names):
            embedding.vectors[i] = tensors[mask_placeholder(name)]
    embedding.info = meta.get("info", {})
    return embedding


# ---------------------------------------------------------------------------------------------------- training


def mask_images(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Masks (B × (1 ×) H × W) as the RGB images the mask model learns and makes: B × 3 × ``size``, {0, 1} (resized
    as :func:`~anomgen.diffusion.text2image.latent_mask` does: bilinear, antialiased, thresholded at 0.5)."""
    return latent_mask(binary_masks(masks), tuple(size)).expand(-1, 3, -1, -1).contiguous()


def mask_loss(stack: TextToImageStack, embedding: MaskEmbedding, masks: torch.Tensor,
              type_ids: torch.Tensor | Sequence[int], generator: torch.Generator | None = None, *,
              templates: Sequence[str] = TEMPLATES_SMALL, flip_p: float = 0.5) -> torch.Tensor:
    """One textual-inversion step of the mask model: the masks as images at the stack's resolution
    (:func:`mask_images`), each flipped horizontally with probability ``flip_p``, prompted with a template around its
    type's vectors; the plain denoising loss (:func:`~anomgen.diffusion.text2image.diffusion_loss`). Draws from
    ``generator`` in this order: the flips, the templates, the VAE posterior, the noise, the timesteps. Gradients reach
    only ``embedding``."""
    size = (stack.resolution, stack.resolution)
    images = mask_images(masks, size)
    batch = images.shape[0]
    flips = (torch.rand(batch, generator=generator) < float(flip_p)).to(images.device)
    if flips.any():
        images = torch.where(flips[:, None, None, None], images.flip(-1), images)
    chosen = draw_templates(templates, generator, batch)
    with torch.no_grad():
        latents = encode_latents(stack, images.to(stack.device), generator=generator)
    prompt = encode_spatial(stack, embedding.tokens(type_ids), chosen)
    return diffusion_loss(stack, latents, prompt.hidden_states, generator=generator)


# ---------------------------------------------------------------------------------------------------- sampling


def masks_from_images(images: torch.Tensor, threshold: float = 0.8) -> torch.Tensor:
    """Decoded images (B × 3 × H × W in [0, 1]) -> masks B × H × W float {0, 1}: the channel mean on [−1, 1]
    strictly above ``threshold``, as the code does."""
    return (to_diffusion_range(images.float()).mean(dim=1) > float(threshold)).float()


def border_lines(mask: torch.Tensor, fraction: float = 1 / 3) -> list[str]:
    """The outermost rows / columns (``top``, ``bottom``, ``left``, ``right``) of an H × W mask with more than
    ``fraction`` of their pixels set (a row holds W pixels, a column H; the code uses w for both on square masks)."""
    on = binary_masks(mask[None] if mask.dim() == 2 else mask)[0, 0]
    height, width = on.shape
    lines = {"top": (on[0], width), "bottom": (on[-1], width), "left": (on[:, 0], height),
             "right": (on[:, -1], height)}
    return [name for name, (line, length) in lines.items() if float(line.sum()) > fraction * length]


def mask_rejection(mask: torch.Tensor, border_fraction: float = 1 / 3, latent_size: tuple[int, int] | None = None,
                   export_size: tuple[int, int] | None = None) -> str | None:
    """Why an H × W mask is not acceptable, or None: ``"empty"``; ``"border"`` (:func:`border_lines`); on the
    ``latent_size`` grid of the generator that will use it (:func:`~anomgen.diffusion.text2image.latent_mask`),
    ``"vanishes"`` (no cell left: nothing to generate) or ``"covers"`` (every cell: no normal part to keep);
    ``"vanishes at export size"`` when it has no pixel left once resized to ``export_size`` (the set's image size)."""
    on = binary_masks(mask[None] if mask.dim() == 2 else mask)
    if not on.any():
        return "empty"
    if border_lines(on[0, 0], border_fraction):
        return "border"
    if latent_size is not None:
        cells = latent_mask(on, tuple(latent_size))
        if not cells.any():
            return "vanishes"
        if cells.all():
            return "covers"
    if export_size is not None and not latent_mask(on, tuple(export_size)).any():
        return "vanishes at export size"
    return None


def first_acceptable(draw: Callable[[int], torch.Tensor], reject: Callable[[torch.Tensor], str | None],
                     max_tries: int, what: str) -> tuple[torch.Tensor, int]:
    """``draw(try)`` until ``reject(mask)`` is None; returns (mask, tries used). After ``max_tries`` rejections: a
    :class:`MaskGenerationError` naming ``what`` (e.g. the defect type), the count and the reasons."""
    if int(max_tries) < 1:
        raise ValueError(f"max_tries must be >= 1, got {max_tries}")
    reasons: Counter = Counter()
    for attempt in range(int(max_tries)):
        mask = draw(attempt)
        why = reject(mask)
        if why is None:
            return mask, attempt + 1
        reasons[why] += 1
    shown = ", ".join(f"{n} {why}" for why, n in sorted(reasons.items()))
    raise MaskGenerationError(
        f"{what}: no acceptable mask in {int(max_tries)} tries (rejected: {shown}; see mask_rejection). Train the "
        "mask model longer, or raise max_tries")


@torch.no_grad()
def sample_mask_images(stack: TextToImageStack, embedding: MaskEmbedding, type_ids: torch.Tensor | Sequence[int],
                       generators: Sequence[torch.Generator], *, steps: int = 100, eta: float = 1.0,
                       guidance_scale: float = 5.0,
                       templates: Sequence[str] = TEMPLATES_SMALL) -> tuple[torch.Tensor, list[str]]:
    """One text-to-image pass of the mask model: B images (B × 3 × H × W in [0, 1], H = the stack's resolution) and
    their templates. Sample i draws from ``generators[i]``: its template, x_T, then (η > 0) the DDIM noise of every
    step. DDIM of the stack's schedule with the LDM sampler's timesteps
    (:data:`~anomgen.generators.anomalydiffusion.DDIM_SETTINGS`), classifier-free guidance ``guidance_scale`` with
    the empty prompt (none at 1)."""
    gens = list(generators)
    batch = len(gens)
    chosen = draw_templates(templates, gens, batch)
    device, unet = stack.device, stack.unet
    context = encode_spatial(stack, embedding.tokens(type_ids).to(device), chosen).hidden_states.to(unet.dtype)
    if context.shape[0] != batch:
        raise ValueError(f"sample_mask_images: {len(gens)} generators for {context.shape[0]} type ids")
    guided = guidance_scale > 1.0
    if guided:
        context = torch.cat([stack.encode_prompts([""] * batch).to(unet.dtype), context])
    latent = stack.resolution // stack.latent_factor
    shape = (1, stack.latent_channels, latent, latent)

    def randn() -> torch.Tensor:
        return torch.cat([torch.randn(shape, generator=g, device=g.device).to(device) for g in gens])

    scheduler = stack.sampling_scheduler("DDIMScheduler", **DDIM_SETTINGS)
    scheduler.set_timesteps(int(steps), device=device)
    latents = randn() * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2) if guided else latents, t)
        pred = unet(model_input.to(unet.dtype), t, encoder_hidden_states=context, return_dict=False)[0].float()
        if guided:
            uncond, cond = pred.chunk(2)
            pred = uncond + guidance_scale * (cond - uncond)
        noise = randn() if eta > 0 else None
        latents = scheduler.step(pred, t, latents, eta=eta, variance_noise=noise, return_dict=False)[0]
    return decode_latents(stack, latents), chosen


@dataclass
class MaskSamples:
    """:func:`sample_masks`' result: ``masks`` B × H × W float {0, 1} (the stack's resolution), ``tries`` per sample
    (1 = the first draw was kept), ``templates`` of the kept draws."""

    masks: torch.Tensor
    tries: list[int]
    templates: list[str]


def sample_masks(stack: TextToImageStack, embedding: MaskEmbedding, type_ids: torch.Tensor | Sequence[int],
                 generators: Sequence[torch.Generator], *, steps: int = 100, eta: float = 1.0,
                 guidance_scale: float = 5.0, threshold: float = 0.8, border_fraction: float = 1 / 3,
                 max_tries: int = 100, templates: Sequence[str] = TEMPLATES_SMALL,
                 latent_size: tuple[int, int] | None = None,
                 export_size: tuple[int, int] | None = None) -> MaskSamples:
    """An acceptable mask per sample: :func:`sample_mask_images` (a batch of one, from ``generators[i]``),
    :func:`masks_from_images`, :func:`mask_rejection` (``latent_size``: the grid of the generator that will use the
    mask; ``export_size``: the size it is saved at), again until accepted; :func:`first_acceptable` gives up after
    ``max_tries`` naming the defect type."""
    ids = [int(i) for i in torch.as_tensor(type_ids).flatten().tolist()]
    gens = list(generators)
    if len(gens) != len(ids):
        raise ValueError(f"sample_masks: {len(gens)} generators for {len(ids)} type ids (one per sample)")
    masks, tries, kept = [], [], []
    for type_id, gen in zip(ids, gens):
        drawn: list[str] = []

        def draw(_attempt: int, type_id=type_id, gen=gen, drawn=drawn) -> torch.Tensor:
            images, chosen = sample_mask_images(stack, embedding, [type_id], [gen], steps=steps, eta=eta,
                                                guidance_scale=guidance_scale, templates=templates)
            drawn[:] = chosen
            return masks_from_images(images, threshold)[0]

        name = embedding.type_names[type_id] if 0 <= type_id < len(embedding.type_names) else type_id
        mask, used = first_acceptable(draw, lambda m: mask_rejection(m, border_fraction, latent_size, export_size),
                                      max_tries, f"mask generation for defect type {name!r}")
        masks.append(mask)
        tries.append(used)
        kept.extend(drawn)
    return MaskSamples(torch.stack(masks).cpu(), tries, kept)

