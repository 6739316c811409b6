"""h-space (Kwon et al. 2023): the output of a diffusion UNet's middle block, read and replaced by a forward hook.

Only the middle-block output changes; the skip connections of the decoder keep coming from the running trajectory.
Works for a diffusers ``UNet2DModel`` (``mid_block``; guided-diffusion checkpoints are converted to one by
:mod:`anomgen.diffusion.adm`) and for any UNet with a ``middle_block`` module.

Mixing two h (:func:`mix_h`): linear interpolation h = (1 − γ) h_style + γ h_content (the synthetic-validation
paper), or spherical interpolation with the content h rescaled to the style h's norm first (DiffStyle).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

MIX_MODES = ("lerp", "slerp")


def middle_block(unet: nn.Module) -> nn.Module:
    """The module whose output is h."""
    for name in ("mid_block", "middle_block"):
        block = getattr(unet, name, None)
        if isinstance(block, nn.Module):
            return block
    raise TypeError(f"{type(unet).__name__} has no `mid_block` or `middle_block`; h-space needs a UNet with one")


class HSpace:
    """A forward hook on the UNet's middle block: ``h`` holds the last output; with ``edit`` set (a function
    h -> h'), the block's output is replaced by ``edit(h)`` (same shape). Use as a context manager or call
    :meth:`remove`."""

    def __init__(self, unet: nn.Module) -> None:
        self.h: torch.Tensor | None = None
        self.edit: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._handle = middle_block(unet).register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, args, output: torch.Tensor):
        self.h = output
        if self.edit is None:
            return None
        edited = self.edit(output)
        if edited.shape != output.shape:
            raise ValueError(f"an h-space edit must keep the shape {tuple(output.shape)}, got {tuple(edited.shape)}")
        return edited

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> HSpace:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def lerp_h(h_style: torch.Tensor, h_content: torch.Tensor, gamma: float) -> torch.Tensor:
    """(1 − γ) h_style + γ h_content."""
    return (1.0 - gamma) * h_style + gamma * h_content


def slerp_h(h_style: torch.Tensor, h_content: torch.Tensor, gamma: float, eps: float = 1e-8) -> torch.Tensor:
    """Spherical interpolation per sample, with the content h first rescaled to the style h's norm."""
    flat_s, flat_c = h_style.flatten(1), h_content.flatten(1)
    norm_s = flat_s.norm(dim=1, keepdim=True)
    flat_c = flat_c * norm_s / flat_c.norm(dim=1, keepdim=True).clamp_min(eps)
    cos = (flat_s * flat_c).sum(1, keepdim=True) / (norm_s * norm_s).clamp_min(eps)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    sin = torch.sin(omega)
    small = sin.abs() < 1e-6  # (anti)parallel: fall back to lerp, which is exact there
    safe = torch.where(small, torch.ones_like(sin), sin)
    w_s = torch.where(small, 1.0 - gamma * torch.ones_like(sin), torch.sin((1.0 - gamma) * omega) / safe)
    w_c = torch.where(small, gamma * torch.ones_like(sin), torch.sin(gamma * omega) / safe)
    return (w_s * flat_s + w_c * flat_c).view_as(h_style)


def mix_h(h_style: torch.Tensor, h_content: torch.Tensor, gamma: float, mode: str = "lerp") -> torch.Tensor:
    if mode == "lerp":
        return lerp_h(h_style, h_content, gamma)
    if mode == "slerp":
        return slerp_h(h_style, h_content, gamma)
    raise ValueError(f"h mixing mode must be one of {MIX_MODES}, got {mode!r}")


def eps_and_edited_eps(eps_model: Callable, hspace: HSpace, x: torch.Tensor, t: int,
                       edit: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε, ε̃) at ``(x, t)``: ε with the UNet's own h, ε̃ with h replaced by ``edit(h)``. One forward of batch 2B
    (every layer of the UNet acts per sample, so this equals two separate calls)."""
    batch = x.shape[0]
    hspace.edit = lambda h: torch.cat([h[:batch], edit(h[batch:])])
    try:
        out = eps_model(torch.cat([x, x]), t)
    finally:
        hspace.edit = None
    return out[:batch], out[batch:]


def edited_generation(eps_model: Callable, hspace: HSpace, x_T: torch.Tensor, schedule,
                      edit: Callable[[int, torch.Tensor], torch.Tensor], t_edit: int, t_boost: int = -1,
                      eta_boost: float = 1.0, generators=None) -> torch.Tensor:
    """DDIM generation from ``x_T`` with an h-space edit (DiffStyle, Asyrp):

    - t ≥ ``t_edit``: the asymmetric step x_{t−1} = √ᾱ_{t−1} P_t(ε̃) + √(1 − ᾱ_{t−1}) ε, ε̃ computed with
      h replaced by ``edit(t, h)``, ε with the trajectory's own h;
    - ``t_boost`` < t < ``t_edit``: plain deterministic DDIM steps;
    - t ≤ ``t_boost`` (quality boosting): stochastic DDIM steps with η = ``eta_boost``, each sample's noise from its
      own generator (``generators``, seeded by the sample's global index). ``t_boost = -1`` turns boosting off.

    Returns x_0 in the diffusion range.
    """
    from anomgen.diffusion.ddim import ddim_step, per_sample_noise

    x = x_T
    for t, t_next in schedule.generation_pairs():
        a_t, a_next = schedule.alpha_bar(t), schedule.alpha_bar(t_next)
        if t >= t_edit:
            eps, eps_edited = eps_and_edited_eps(eps_model, hspace, x, t, lambda h, t=t: edit(t, h))
            x = ddim_step(x, eps_edited, a_t, a_next, eps_direction=eps)
        elif t <= t_boost and eta_boost > 0 and t_next >= 0:
            x = ddim_step(x, eps_model(x, t), a_t, a_next, eta=eta_boost, noise=per_sample_noise(x, generators))
        else:
            x = ddim_step(x, eps_model(x, t), a_t, a_next)
    return x
