"""Samplers of a score-based SDE, with the loop written out: predictor steps, the Langevin corrector, and the
predictor–corrector and Euler–Maruyama loops that FITYMI draws its fake normals with.

The samplers work in the diffusion range; turn samples into images with ``anomgen.pixels.from_diffusion_range``.

Time grid. The full grid is ``linspace(T, eps, N)`` (``eps`` defaults to ``sde.eps``); its k-th time falls on the
discrete chain's index N − 1 − k. With ``num_steps == N`` (the default) the reverse-diffusion predictor steps from
each grid index to its neighbour, exactly the discrete chain of the SDE. With ``num_steps < N`` the grid is strided:
``num_steps`` evenly spaced points of the full grid (first and last kept), and the step at ``times[k]`` goes from its
grid index straight to the grid index of ``times[k + 1]`` (VE: G² = σ_i² − σ_j², VP: a = ᾱ_i / ᾱ_j, see
``SDE.discretize``); the last step goes to "no noise". The reverse-diffusion predictor is first order: with the exact
score of a Gaussian, a VE chain of 200 strided steps overshoots the data variance by about 4 %, 1000 steps by under
1 %. Euler–Maruyama uses the constant step dt = −T / num_steps (the reference's −1 / N for the full grid).

Order in one predictor–corrector iteration at time t: the corrector steps first, then the predictor (the order of the
reference implementation; the state entering iteration k is at noise level times[k]). With ``denoise`` the last
predictor step returns its mean, without the final noise.

Randomness. ``generator`` is ``None``, one ``torch.Generator`` for the whole batch, or a list with one generator per
sample (``anomgen.seeding.sample_generator(seed, global_index)``). With a list, every draw of sample ``i`` (the prior,
each corrector and predictor noise) comes from generator ``i`` only, and — with the default per-sample corrector step
size — nothing else couples the samples, so sample ``i`` is the same whatever batch it is generated in (given a score
function that treats samples independently, e.g. a UNet in eval mode).

Langevin step size. score_sde sets ε = 2 α (snr ‖z‖ / ‖∇‖)², where ‖z‖ and ‖∇‖ are norms of each sample's noise and
score, *averaged over the batch*, so one ε serves the whole batch. That makes a sample depend on its batch-mates,
which the project's seeding rule forbids, so the default here (``corrector_norms="sample"``) uses each sample's own
norms: ε_i = 2 α_i (snr ‖z_i‖ / ‖∇_i‖)². The step then depends on the sample's own state, which biases the
Langevin chain by roughly 4 / d in d dimensions. Measured with the exact score of a Gaussian (snr 0.16, N = 1000;
the ratio of sampled to true variance): d = 64: 1.09 per sample vs 1.03 batch-averaged; d = 256: 1.045; d = 784:
1.036 vs 1.031; at d ≤ 16 the per-sample step is unusable (d = 4: 2.7). Image data (8×8×3 = 192 and up) are in the
safe range. ``corrector_norms="batch"`` reproduces the reference's batch-averaged norms exactly, at the price of
batch independence.
"""

from __future__ import annotations

import math

import torch

from anomgen.diffusion.sde import SDE, GeneratorArg, ScoreFn, _as_time, _per_sample, randn
from anomgen.progress import progress as progress_bar

__all__ = [
    "euler_maruyama_predictor_step",
    "euler_maruyama_sample",
    "langevin_corrector_step",
    "pc_sample",
    "reverse_diffusion_predictor_step",
    "time_grid",
]

_NORMS = ("sample", "batch")
_PREDICTORS = ("reverse_diffusion", "euler_maruyama")


def reverse_diffusion_predictor_step(
    x: torch.Tensor,
    t,
    score_fn: ScoreFn,
    sde: SDE,
    generator: GeneratorArg = None,
    t_next=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse-diffusion predictor step at time ``t`` -> (x, x_mean).

    With (f, G) = ``sde.discretize(x, t, t_next)`` the reverse step is x_mean = x − f + G² s(x, t), x = x_mean + G z.
    """
    t = _as_time(t, x)
    f, G = sde.discretize(x, t, t_next)
    G = _per_sample(G, x)
    score = score_fn(x, t)
    x_mean = x - f + G**2 * score
    z = randn(x.shape, generator, device=x.device, dtype=x.dtype)
    return x_mean + G * z, x_mean


def euler_maruyama_predictor_step(
    x: torch.Tensor,
    t,
    score_fn: ScoreFn,
    sde: SDE,
    generator: GeneratorArg = None,
    dt: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler–Maruyama step of the reverse SDE dx = [f − g² s] dt + g dw̄ with dt < 0 (default −T / N)
    -> (x, x_mean): x_mean = x + (f − g² s) dt, x = x_mean + g sqrt(−dt) z."""
    t = _as_time(t, x)
    dt = -sde.T / sde.N if dt is None else float(dt)
    if dt >= 0:
        raise ValueError(f"the reverse SDE runs backwards in time: dt must be negative, got {dt}")
    drift, diffusion = sde.sde(x, t)
    diffusion = _per_sample(diffusion, x)
    score = score_fn(x, t)
    x_mean = x + (drift - diffusion**2 * score) * dt
    z = randn(x.shape, generator, device=x.device, dtype=x.dtype)
    return x_mean + diffusion * math.sqrt(-dt) * z, x_mean


def langevin_corrector_step(
    x: torch.Tensor,
    t,
    score_fn: ScoreFn,
    sde: SDE,
    snr: float = 0.16,
    generator: GeneratorArg = None,
    n_steps: int = 1,
    corrector_norms: str = "sample",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_steps`` Langevin steps at time ``t`` -> (x, x_mean).

    Each step: ∇ = s(x, t), z ~ N(0, I), ε = 2 α (snr ‖z‖ / ‖∇‖)² (α = 1 for VE, α_i = 1 − β_i for VP),
    x_mean = x + ε ∇, x = x_mean + sqrt(2 ε) z. Norms are per sample (``corrector_norms="sample"``, the default) or
    averaged over the batch as in the reference (``"batch"``); see the module docstring.
    """
    if corrector_norms not in _NORMS:
        raise ValueError(f"corrector_norms must be one of {_NORMS}, got {corrector_norms!r}")
    t = _as_time(t, x)
    alpha = sde.langevin_alpha(x, t)
    x_mean = x
    for _ in range(n_steps):
        grad = score_fn(x, t)
        noise = randn(x.shape, generator, device=x.device, dtype=x.dtype)
        grad_norm = grad.reshape(grad.shape[0], -1).norm(dim=-1)
        noise_norm = noise.reshape(noise.shape[0], -1).norm(dim=-1)
        if corrector_norms == "batch":
            grad_norm = grad_norm.mean().expand_as(grad_norm)
            noise_norm = noise_norm.mean().expand_as(noise_norm)
        step = 2.0 * alpha * (snr * noise_norm / grad_norm.clamp_min(torch.finfo(grad_norm.dtype).tiny)) ** 2
        step = _per_sample(step, x)
        x_mean = x + step * grad
        x = x_mean + torch.sqrt(2.0 * step) * noise
    return x, x_mean


def time_grid(sde: SDE, num_steps: int | None = None, eps: float | None = None, device=None) -> torch.Tensor:
    """The sampler's times (float32): the full grid ``linspace(T, eps, N)`` (``eps`` defaults to ``sde.eps``) or, for
    ``num_steps < N``, ``num_steps`` of its points evenly strided, always keeping the first (T) and the last (eps)."""
    num_steps = sde.N if num_steps is None else int(num_steps)
    if num_steps < 1:
        raise ValueError(f"num_steps must be positive, got {num_steps}")
    if num_steps > sde.N:
        raise ValueError(f"num_steps ({num_steps}) cannot exceed the SDE's N ({sde.N})")
    eps = sde.eps if eps is None else float(eps)
    full = torch.linspace(sde.T, eps, sde.N, dtype=torch.float64)
    if num_steps < sde.N:
        full = full[torch.linspace(0, sde.N - 1, num_steps, dtype=torch.float64).round().long()]
    return full.to(device=device, dtype=torch.float32)


@torch.no_grad()
def pc_sample(
    score_fn: ScoreFn,
    sde: SDE,
    shape,
    generator: GeneratorArg = None,
    snr: float = 0.16,
    n_steps_corrector: int = 1,
    denoise: bool = True,
    num_steps: int | None = None,
    progress: bool = True,
    predictor: str = "reverse_diffusion",
    corrector_norms: str = "sample",
    eps: float | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Predictor–corrector sampling: x_T from the prior, then at each time of the grid ``n_steps_corrector`` Langevin
    steps followed by one predictor step (reverse diffusion by default, or ``"euler_maruyama"``).

    ``shape`` is the batch shape (B, C, H, W) or any (B, ...). Returns the samples in the diffusion range.
    """
    if predictor not in _PREDICTORS:
        raise ValueError(f"predictor must be one of {_PREDICTORS}, got {predictor!r}")
    if device is None and generator is not None:
        first = generator if isinstance(generator, torch.Generator) else next(iter(generator))
        device = first.device
    times = time_grid(sde, num_steps, eps, device=device)
    steps = len(times)
    strided = steps != sde.N
    dt = -sde.T / steps

    x = sde.prior_sampling(shape, generator, device=device, dtype=dtype)
    x_mean = x
    for k in progress_bar(range(steps), desc=f"{sde.kind.upper()}-SDE sampling", enabled=progress):
        t = times[k].expand(x.shape[0]).to(dtype)
        if n_steps_corrector > 0:
            x, x_mean = langevin_corrector_step(
                x, t, score_fn, sde, snr, generator, n_steps=n_steps_corrector, corrector_norms=corrector_norms
            )
        if predictor == "reverse_diffusion":
            t_next = times[k + 1] if strided and k + 1 < steps else None
            x, x_mean = reverse_diffusion_predictor_step(x, t, score_fn, sde, generator, t_next=t_next)
        else:
            x, x_mean = euler_maruyama_predictor_step(x, t, score_fn, sde, generator, dt=dt)
    return x_mean if denoise else x


def euler_maruyama_sample(
    score_fn: ScoreFn,
    sde: SDE,
    shape,
    generator: GeneratorArg = None,
    denoise: bool = True,
    num_steps: int | None = None,
    progress: bool = True,
    eps: float | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Euler–Maruyama integration of the reverse SDE from the prior (no corrector), dt = −T / num_steps."""
    return pc_sample(
        score_fn,
        sde,
        shape,
        generator,
        n_steps_corrector=0,
        denoise=denoise,
        num_steps=num_steps,
        progress=progress,
        predictor="euler_maruyama",
        eps=eps,
        device=device,
        dtype=dtype,
    )
