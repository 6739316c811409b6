"""SDEdit pseudo-anomalies (ADP, METHODS.md §3): noise a normal image part-way, denoise it with a "damage" prompt
in a text-to-image latent diffusion model, then take a random resized crop of the result.

The whole algorithm, given a frozen Stable-Diffusion-like stack (any object with ``unet``, ``vae`` and ``scheduler``
attributes: the project's text-to-image stack, a diffusers pipeline, a tiny random stack in tests):

1. Encode the normal images (in [0, 1], mapped to [-1, 1]) with the VAE and sample its posterior, times the VAE's
   scaling factor: z_0.
2. ``scheduler.set_timesteps(num_inference_steps)``; the edit starts ``int(num_inference_steps · strength)`` steps
   from the end of the schedule (``t_start = steps − that``), as diffusers' img2img pipeline does, and
   z_t = ``scheduler.add_noise(z_0, ε, t)`` at the first kept timestep.
3. Denoise over the kept timesteps with classifier-free guidance, ε̂ = ε_u + w (ε_c − ε_u), the conditional and
   unconditional ("negative") prompt embeddings given by the caller; any diffusers scheduler does the step (its
   ``prediction_type``, ε or v, is read from its own config).
4. Decode z / scaling factor with the VAE and map back to [0, 1].
5. A random resized crop of each result (torchvision's ``RandomResizedCrop`` box and defaults,
   :func:`anomgen.pixels.random_resized_crop_box`), resized to the requested size.

Steps 1-4 are :func:`sdedit`; it draws its noise in the order of ``StableDiffusionImg2ImgPipeline`` (posterior
sample, start noise, then the scheduler's own draws) from one ``torch.Generator`` or one per sample, so with the same
embeddings, settings and generator(s) its output is the pipeline's (``tests/generators/test_sdedit.py``).
:class:`SDEditGenerator` adds the crop and the per-sample bookkeeping: sample ``i``'s draws come only from its own
generator (seeded by its global index), the crop box first, so a sample does not depend on the batch it is in.

Prompt encoding is not done here: the caller passes embeddings (``encode_prompts`` of ``models.sdedit`` for plain
prompts; a concept-aware encoder for ADP's learned tokens).

Masks: SDEdit re-renders the whole image and nobody knows which pixels the "damage" prompt turned into a defect (it
may be none), so a pseudo-anomaly has **no mask** (``None``; the synthetic set writes ``mask: null`` and the record
reader gives zeros with an empty ``mask_path``, the convention for images without a ground truth). An all-ones mask
would claim every pixel is defective, an all-zeros one that none is; both would corrupt pixel-level metrics.

The hyperparameters are declared once by :class:`SDEditConfig`. ADP's strength, step count and guidance scale are in
a supplement we do not have *(check)*; the defaults are diffusers' img2img defaults (0.8, 50, 7.5).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol

import torch

from anomgen.pixels import (
    CROP_RATIO,
    CROP_SCALE,
    from_diffusion_range,
    random_resized_crop_box,
    resized_crop,
    to_diffusion_range,
)

NAME = "sdedit"

Generators = torch.Generator | Sequence[torch.Generator]


class DiffusionStack(Protocol):
    """What SDEdit needs of a text-to-image stack: a conditional latent UNet, its VAE and a diffusers scheduler.
    An optional ``scaling_factor`` attribute overrides ``vae.config.scaling_factor``."""

    unet: Any
    vae: Any
    scheduler: Any


@dataclass(frozen=True)
class SDEditConfig:
    """SDEdit's hyperparameters, declared once. ``strength`` in [0, 1] is the share of the schedule that is re-noised
    (0: no edit, only the VAE round trip; 1: from pure noise); ``crop_scale`` / ``crop_ratio`` are the random resized
    crop's area share and aspect-ratio range (torchvision's defaults); ``crop=False`` keeps the whole image."""

    strength: float = 0.8  # (check): diffusers' img2img default; ADP's value is in its supplement
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    eta: float = 0.0  # DDIM's η, passed to schedulers whose step takes it (as the pipeline does)
    crop: bool = True
    crop_scale: tuple[float, float] = CROP_SCALE
    crop_ratio: tuple[float, float] = CROP_RATIO

    def __post_init__(self) -> None:
        object.__setattr__(self, "crop_scale", tuple(float(v) for v in self.crop_scale))
        object.__setattr__(self, "crop_ratio", tuple(float(v) for v in self.crop_ratio))
        _check_settings(self.strength, self.num_inference_steps)
        if not (0.0 < self.crop_scale[0] <= self.crop_scale[1] and 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]):
            raise ValueError(f"sdedit: crop_scale and crop_ratio must be (min, max) with 0 < min <= max, got "
                             f"{self.crop_scale}, {self.crop_ratio}")


def _check_settings(strength: float, num_inference_steps: int) -> None:
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"sdedit: strength must be in [0, 1], got {strength}")
    if int(num_inference_steps) < 1:
        raise ValueError(f"sdedit: num_inference_steps must be >= 1, got {num_inference_steps}")


def _randn(shape: Sequence[int], generator: Generators | None, device: torch.device,
           dtype: torch.dtype) -> torch.Tensor:
    """Standard normal noise: one draw of the whole batch from one generator, or row ``i`` from ``generator[i]``
    (drawn on the generator's device, then moved), the order of diffusers' ``randn_tensor``."""
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"sdedit: {len(generator)} generators for a batch of {shape[0]}")
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype).to(device)
                      for g in generator])


def edit_timesteps(scheduler, num_inference_steps: int, strength: float,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Set the scheduler's timesteps (on ``device``) and return the ones the edit visits: the last
    ``int(steps · strength)`` steps (× the scheduler's order), as diffusers' img2img pipeline chooses them. Empty when
    that is 0."""
    _check_settings(strength, num_inference_steps)
    if device is not None and "device" in inspect.signature(scheduler.set_timesteps).parameters:
        scheduler.set_timesteps(int(num_inference_steps), device=device)
    else:
        scheduler.set_timesteps(int(num_inference_steps))
    init_steps = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init_steps, 0)
    order = getattr(scheduler, "order", 1)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start * order)
    return scheduler.timesteps[t_start * order:]


def _step_kwargs(scheduler, generator: Generators | None, eta: float) -> dict:
    """``generator`` and ``eta`` for the schedulers whose ``step`` takes them."""
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs = {}
    if "generator" in accepted:
        kwargs["generator"] = generator if generator is None or isinstance(generator, torch.Generator) \
            else list(generator)
    if "eta" in accepted:
        kwargs["eta"] = eta
    return kwargs


def scaling_factor(stack: DiffusionStack) -> float:
    value = getattr(stack, "scaling_factor", None)
    return float(stack.vae.config.scaling_factor if value is None else value)


@torch.no_grad()
def sdedit(stack: DiffusionStack, images: torch.Tensor, prompt_embeds: torch.Tensor,
           negative_prompt_embeds: torch.Tensor | None = None, strength: float = 0.8, num_inference_steps: int = 50,
           guidance_scale: float = 7.5, generator: Generators | None = None, eta: float = 0.0) -> torch.Tensor:
    """SDEdit of ``images`` (B × 3 × H × W in [0, 1], H and W multiples of the VAE's downsampling) -> B × 3 × H × W
    in [0, 1]. ``prompt_embeds`` / ``negative_prompt_embeds``: B × L × d (or 1 × L × d, broadcast), the text
    encoder's output for the prompts and for the unconditional prompt; the negative ones are needed only when
    ``guidance_scale > 1`` (with ``guidance_scale <= 1`` the prompt alone conditions the UNet, as in diffusers).
    ``generator``: one ``torch.Generator`` for the batch or one per sample. Steps: see the module docstring."""
    unet, vae, scheduler = stack.unet, stack.vae, stack.scheduler
    device = next(unet.parameters()).device
    dtype = prompt_embeds.dtype
    batch = images.shape[0]
    guided = guidance_scale > 1.0
    if guided and negative_prompt_embeds is None:
        raise ValueError("sdedit: guidance_scale > 1 needs negative_prompt_embeds (the unconditional embeddings)")

    def per_sample(embeds: torch.Tensor, name: str) -> torch.Tensor:
        if embeds.dim() != 3 or embeds.shape[0] not in (1, batch):
            raise ValueError(f"sdedit: {name} must be B × L × d or 1 × L × d for B = {batch}, "
                             f"got {tuple(embeds.shape)}")
        return embeds.to(device=device, dtype=dtype).expand(batch, -1, -1)

    cond = per_sample(prompt_embeds, "prompt_embeds")
    context = torch.cat([per_sample(negative_prompt_embeds, "negative_prompt_embeds"), cond]) if guided else cond
    factor = scaling_factor(stack)
    timesteps = edit_timesteps(scheduler, num_inference_steps, strength, device)

    # 1. z_0: a sample of the VAE posterior (the pipeline's first draw)
    posterior = vae.encode(to_diffusion_range(images).to(device=device, dtype=dtype)).latent_dist
    latents = posterior.mean + posterior.std * _randn(posterior.mean.shape, generator, device, dtype)
    latents = latents * factor
    if len(timesteps) > 0:
        # 2. re-noise to the first kept timestep (the second draw)
        noise = _randn(latents.shape, generator, device, dtype)
        latents = scheduler.add_noise(latents, noise, timesteps[:1].repeat(batch))
        # 3. guided denoising; stochastic schedulers draw from the same generator(s)
        step_kwargs = _step_kwargs(scheduler, generator, eta)
        for t in timesteps:
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            pred = unet(model_input, t, encoder_hidden_states=context, return_dict=False)[0]
            if guided:
                pred_uncond, pred_cond = pred.chunk(2)
                pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
            latents = scheduler.step(pred, t, latents, **step_kwargs, return_dict=False)[0]
    # 4. decode
    decoded = vae.decode(latents / factor, return_dict=False)[0]
    return from_diffusion_range(decoded.float())


class SDEditGenerator:
    """SDEdit + a random resized crop per sample; see the module docstring.

    ``SDEditGenerator(stack, config)`` or ``SDEditGenerator(stack, strength=0.5, ...)`` (keyword arguments override
    ``config``'s fields, :class:`SDEditConfig`). The stack stays frozen."""

    name = NAME

    def __init__(self, stack: DiffusionStack, config: SDEditConfig | None = None, **overrides) -> None:
        self.config = replace(config or SDEditConfig(), **overrides)
        self.stack = stack
        for part in (stack.unet, stack.vae):
            part.eval().requires_grad_(False)

    @property
    def params(self) -> dict:
        """The settings every sample's manifest row records (with its prompt, seed and crop box)."""
        c = self.config
        scheduler = self.stack.scheduler
        return {"strength": c.strength, "num_inference_steps": c.num_inference_steps,
                "guidance_scale": c.guidance_scale, "eta": c.eta,
                "denoising_steps": min(int(c.num_inference_steps * c.strength), c.num_inference_steps),
                "scheduler": type(scheduler).__name__,
                "prediction_type": getattr(scheduler.config, "prediction_type", None),
                "crop_scale": list(c.crop_scale), "crop_ratio": list(c.crop_ratio)}

    def crop_box(self, height: int, width: int, generator: torch.Generator) -> tuple[int, int, int, int]:
        """Sample ``(top, left, h, w)`` of the random resized crop (the whole image when ``crop`` is off)."""
        if not self.config.crop:
            return 0, 0, height, width
        return random_resized_crop_box(height, width, self.config.crop_scale, self.config.crop_ratio, generator)

    def __call__(self, images: torch.Tensor, prompt_embeds: torch.Tensor, negative_prompt_embeds: torch.Tensor | None,
                 generators: Sequence[torch.Generator], size: tuple[int, int] | None = None,
                 prompts: Sequence[str] | None = None) -> tuple[torch.Tensor, list[dict]]:
        """``images`` B × 3 × H × W in [0, 1]; embeddings B × L × d (or 1 × L × d); one generator per sample ->
        (B × 3 × size pseudo-anomalies in [0, 1] on the CPU, B parameter dicts). ``size`` defaults to H × W;
        ``prompts`` (the texts behind the embeddings) are recorded in the parameters.

        Sample ``i`` draws its crop box, then all its SDEdit noise, from ``generators[i]`` only."""
        batch, _, height, width = images.shape
        if len(generators) != batch:
            raise ValueError(f"sdedit: {len(generators)} generators for a batch of {batch} (one per sample)")
        if prompts is not None and len(prompts) != batch:
            raise ValueError(f"sdedit: {len(prompts)} prompts for a batch of {batch}")
        size = (height, width) if size is None else tuple(size)
        boxes = [self.crop_box(height, width, g) for g in generators]
        c = self.config
        edited = sdedit(self.stack, images, prompt_embeds, negative_prompt_embeds, strength=c.strength,
                        num_inference_steps=c.num_inference_steps, guidance_scale=c.guidance_scale,
                        generator=list(generators), eta=c.eta).cpu()
        out = torch.stack([resized_crop(image, box, size) for image, box in zip(edited, boxes)])
        common = self.params
        params = [{**common, "crop_box": list(box), **({} if prompts is None else {"prompt": prompts[j]})}
                  for j, box in enumerate(boxes)]
        return out, params

    def __repr__(self) -> str:
        return f"SDEditGenerator({asdict(self.config)})"
