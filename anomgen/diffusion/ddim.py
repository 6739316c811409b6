"""DDIM (Song, Meng & Ermon 2021): the step, deterministic inversion and generation, written out.

The ᾱ table comes from a diffusers ``DDIMScheduler`` (linear betas 1e-4 → 0.02 over T = 1000 by default, the
guided-diffusion / DDPM schedule); the timestep grid and the loops are here, so that h-space edits
(:mod:`anomgen.diffusion.hspace`) and the asymmetric step of DiffStyle / Asyrp can be put inside them.

Conventions (those of Asyrp_official and InjectFusion, the DiffStyle / Asyrp reference code)
--------------------------------------------------------------------------------------------
* Images are in the diffusion range [-1, 1] (``anomgen.pixels.to_diffusion_range``).
* The grid: ``spacing="linspace"`` (default) is the references' ``int(s + 1e-6)`` of ``linspace(0, 1, n) · (T − 1)``,
  which reaches T − 1: 999, 978, 958, ..., 20, 0 for 50 steps. ``spacing="leading"`` is diffusers' grid
  (980, 960, ..., 0), kept for comparisons with diffusers' schedulers.
* ``schedule.timesteps`` run downwards (generation order). Generation at timestep ``t`` evaluates ε(x_t, t) and steps
  to the next timestep below (ᾱ = 1 after the last one, 0): ``n`` model calls.
* Inversion runs the same grid upwards and also evaluates the model at the current x with its own level's label: the
  step from level ``s`` to the next level ``t`` above uses ε(x_s, s). The clean image stands at the lowest timestep
  (0, ᾱ_0 = 1 − β_0), as in the references, so inversion makes ``n − 1`` model calls, at every timestep but the
  top one. Whatever is read during the call at ``s`` (the h-space of DiffStyle's content image) is h(x_s, s): the
  label and the noise level agree, as they do in generation.
  (diffusers' ``DDIMInverseScheduler`` instead evaluates ε(x_s, t), the *target* level's label.)
* An ``eps_model(x, t)`` returns ε with the shape of ``x``; :class:`EpsModel` wraps a diffusers ``UNet2DModel``
  (also one converted from guided-diffusion, whose extra σ channels are dropped).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from anomgen.progress import progress

EpsFn = Callable[[torch.Tensor, int], torch.Tensor]
#: the DDPM / guided-diffusion schedule
DEFAULT_BETAS = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear"}


SPACINGS = ("linspace", "leading")


def linspace_timesteps(num_inference_steps: int, num_train_timesteps: int = 1000) -> list[int]:
    """The references' grid, descending: ``int(s + 1e-6)`` for ``s`` in ``linspace(0, 1, n) · (T − 1)`` (Asyrp_official
    and InjectFusion, ``seq_inv``): from T − 1 down to 0, e.g. 999, 978, 958, ..., 20, 0 for n = 50."""
    import numpy as np

    grid = np.linspace(0, 1, num_inference_steps) * (num_train_timesteps - 1)
    return sorted({int(s + 1e-6) for s in grid}, reverse=True)


class DDIMSchedule:
    """ᾱ_t of the training schedule and the ``num_inference_steps`` timesteps DDIM visits (``spacing``: "linspace",
    the references' grid up to T − 1, or "leading", diffusers' grid; see the module docstring)."""

    def __init__(self, num_inference_steps: int = 50, num_train_timesteps: int = 1000, beta_start: float = 1e-4,
                 beta_end: float = 0.02, beta_schedule: str = "linear", spacing: str = "linspace") -> None:
        from diffusers import DDIMScheduler

        if not 2 <= num_inference_steps <= num_train_timesteps:
            raise ValueError(f"num_inference_steps must be in [2, {num_train_timesteps}], got {num_inference_steps}")
        if spacing not in SPACINGS:
            raise ValueError(f"DDIM spacing must be one of {SPACINGS}, got {spacing!r}")
        scheduler = DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                                  beta_schedule=beta_schedule, clip_sample=False, set_alpha_to_one=True,
                                  steps_offset=0, timestep_spacing="leading")
        scheduler.set_timesteps(num_inference_steps)
        self.alphas_cumprod = scheduler.alphas_cumprod.double()
        if spacing == "linspace":
            self.timesteps = linspace_timesteps(num_inference_steps, num_train_timesteps)
        else:
            self.timesteps = [int(t) for t in scheduler.timesteps]  # descending
        self.spacing = spacing
        self.num_train_timesteps = num_train_timesteps

    def alpha_bar(self, t: int) -> float:
        """ᾱ_t; ``t = -1`` is the clean image (ᾱ = 1)."""
        return 1.0 if t < 0 else float(self.alphas_cumprod[t])

    def generation_pairs(self) -> Iterator[tuple[int, int]]:
        """``(t, t_next)`` in generation order; the last ``t_next`` is -1 (the clean image)."""
        ts = self.timesteps
        return iter(zip(ts, [*ts[1:], -1]))

    def inversion_pairs(self) -> Iterator[tuple[int, int]]:
        """``(s, t)`` in inversion order: from the lowest timestep (where the clean image stands) up to the largest;
        the step evaluates the model at level ``s`` with label ``s``."""
        ts = self.timesteps[::-1]
        return iter(zip(ts[:-1], ts[1:]))


def predict_x0(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: float) -> torch.Tensor:
    """P_t(ε) = (x_t − √(1 − ᾱ_t) ε) / √ᾱ_t, the x_0 that ε implies."""
    return (x_t - (1.0 - alpha_bar_t) ** 0.5 * eps) / alpha_bar_t**0.5


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: float, alpha_bar_next: float, eta: float = 0.0,
              noise: torch.Tensor | None = None, eps_direction: torch.Tensor | None = None) -> torch.Tensor:
    """One DDIM step from level ᾱ_t to level ᾱ_next (down in generation, up in inversion):

    x_next = √ᾱ_next · P_t(ε) + √(1 − ᾱ_next − σ²) · D + σ z,  σ = η √((1 − ᾱ_next)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_next),

    with D = ``eps_direction`` when given (the asymmetric step of DiffStyle / Asyrp: P_t from the edited ε̃, the
    direction from the original ε), else ε. ``noise`` z is required when η > 0.
    """
    x0 = predict_x0(x_t, eps, alpha_bar_t)
    sigma = 0.0
    if eta > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs `noise`")
        sigma = eta * ((1 - alpha_bar_next) / (1 - alpha_bar_t)) ** 0.5 * (1 - alpha_bar_t / alpha_bar_next) ** 0.5
    direction = eps if eps_direction is None else eps_direction
    out = alpha_bar_next**0.5 * x0 + max(1.0 - alpha_bar_next - sigma**2, 0.0) ** 0.5 * direction
    return out + sigma * noise if eta > 0 else out


class EpsModel(nn.Module):
    """``(x, t) -> ε`` for a diffusers ``UNet2DModel``: the timestep broadcast to the batch, the ``.sample`` taken,
    and, for a model that also predicts σ (guided-diffusion's ``learn_sigma``: twice the input channels), only the
    first half of the channels kept."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        timestep = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        out = self.unet(x, timestep)
        from anomgen.diffusion.adm import eps_from_output

        return eps_from_output(getattr(out, "sample", out), x.shape[1])


@torch.no_grad()
def ddim_invert(eps_model: EpsFn, x0: torch.Tensor, schedule: DDIMSchedule,
                on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Deterministic DDIM inversion x_0 → x_T: the clean image taken as the state at the lowest timestep, then one
    step up per timestep with ε(x_s, s) (``len(timesteps) − 1`` model calls). ``on_step(s, x_s)`` is called after
    the model call at level and label ``s`` (e.g. to keep the h-space features a hook captured there)."""
    x = x0
    steps = len(schedule.timesteps) - 1
    for s, t in progress(schedule.inversion_pairs(), desc="DDIM inversion", total=steps):
        eps = eps_model(x, s)
        if on_step is not None:
            on_step(s, x)
        x = ddim_step(x, eps, schedule.alpha_bar(s), schedule.alpha_bar(t))
    return x


@torch.no_grad()
def ddim_generate(eps_model: EpsFn, x_T: torch.Tensor, schedule: DDIMSchedule, eta: float = 0.0,
                  generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
    """Plain DDIM generation x_T → x_0; with η > 0 each sample's noise comes from its own generator."""
    x = x_T
    for t, t_next in schedule.generation_pairs():
        eps = eps_model(x, t)
        noise = per_sample_noise(x, generators) if eta > 0 and t_next >= 0 else None
        x = ddim_step(x, eps, schedule.alpha_bar(t), schedule.alpha_bar(t_next), eta if noise is not None else 0.0,
                      noise)
    return x


def per_sample_noise(like: torch.Tensor, generators: Sequence[torch.Generator] | None) -> torch.Tensor:
    """Standard normal noise shaped like ``like``, row ``i`` drawn from ``generators[i]`` (on CPU, then moved)."""
    if generators is None:
        raise ValueError("stochastic steps need one torch.Generator per sample (seeded by its global index)")
    if len(generators) != like.shape[0]:
        raise ValueError(f"{len(generators)} generators for a batch of {like.shape[0]}")
    return torch.stack([torch.randn(like.shape[1:], generator=g, dtype=torch.float32) for g in generators]).to(
        device=like.device, dtype=like.dtype)
