"""Score-based generative modelling through SDEs (Song et al. 2021): the SDEs, the denoising score-matching loss
and the score networks that FITYMI trains on the normal class.

Everything here works in the diffusion range [-1, 1]: data in [0, 1] go in through
``anomgen.pixels.to_diffusion_range`` and samples come out through ``anomgen.pixels.from_diffusion_range``.

Conventions
-----------
* Time runs from ``eps`` (data) to ``T = 1`` (prior). ``t`` is a tensor of shape ``(B,)`` (a float is broadcast).
* ``sde(x, t) -> (drift, diffusion)`` of the forward SDE dx = f(x, t) dt + g(t) dw; ``diffusion`` has shape ``(B,)``.
* ``marginal_prob(x0, t) -> (mean, std)`` of the perturbation kernel p_t(x_t | x_0) = N(mean, std² I); ``std`` has
  shape ``(B,)``.
* ``discretize(x, t, t_next=None) -> (f, G)``: one step of the forward chain x_i = x_{i-1} + f + G z on the discrete
  grid of ``N`` noise levels, the form the reverse-diffusion predictor inverts. ``t`` is mapped to the grid index
  ``i = floor(t (N - 1) / T)``; the step goes from index ``i`` down to the index of ``t_next`` (default ``i - 1``, the
  grid neighbour; index -1 is "no noise"). A ``t_next`` further down the grid makes a strided step (used when a
  sampler runs with fewer steps than ``N``).
  - VE: f = 0, G = sqrt(σ_i² − σ_j²).
  - VP (the DDPM forward step): with a = ᾱ_i / ᾱ_j (= α_i = 1 − β_i for the neighbour), f = (sqrt(a) − 1) x,
    G = sqrt(1 − a).
* A score function ``score_fn(x, t)`` returns ∇_x log p_t(x) with the shape of ``x``. ``score_fn_from_unet`` wraps a
  diffusers ``UNet2DModel``:
  - VE: the UNet uses the Gaussian-Fourier time embedding and is given ``timestep = σ(t)``. diffusers' UNet2DModel
    embeds log σ and divides its output by the timestep when ``time_embedding_type == "fourier"``, so the model output
    *is* the score (the network learns σ · score); nothing is divided a second time. A VE network with another
    time embedding is given σ too and its output is divided by σ here.
  - VP: the UNet uses the sinusoidal ("positional") embedding, is given ``timestep = t (N − 1)`` (t · 999 for
    N = 1000) and predicts the noise ε; score = −output / std(t).

Random draws
------------
Every function that draws takes ``generator``: ``None`` (the global stream), one ``torch.Generator`` (the whole batch
from one stream), or a sequence of generators, one per sample (typically ``anomgen.seeding.sample_generator(seed,
global_index)``). With a sequence, sample ``i``'s noise is drawn from generator ``i`` alone, so a sample does not depend
on the batch it was generated in.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence

import torch

from anomgen.errors import ConfigError

GeneratorArg = torch.Generator | Sequence[torch.Generator] | None
ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

__all__ = [
    "SDE",
    "VESDE",
    "VPSDE",
    "dsm_loss",
    "make_sde",
    "rand",
    "randn",
    "score_fn_from_unet",
    "score_unet",
    "tiny_score_unet",
]


# --------------------------------------------------------------------------------------------------------------------
# random draws with one generator or one generator per sample
# --------------------------------------------------------------------------------------------------------------------


def _draw(fn, shape, generator: GeneratorArg, device, dtype) -> torch.Tensor:
    shape = tuple(int(s) for s in shape)
    dtype = dtype or torch.get_default_dtype()
    if generator is None:
        return fn(shape, device=device, dtype=dtype)
    if isinstance(generator, torch.Generator):
        out = fn(shape, generator=generator, device=generator.device, dtype=dtype)
        return out if device is None else out.to(device)
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ValueError(f"got {len(generators)} generators for a batch of {shape[0]}: one generator per sample")
    out = torch.stack([fn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in generators])
    return out if device is None else out.to(device)


def randn(shape, generator: GeneratorArg = None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal draws of ``shape``; with a sequence of generators, row ``i`` comes from generator ``i``."""
    return _draw(torch.randn, shape, generator, device, dtype)


def rand(shape, generator: GeneratorArg = None, device=None, dtype=None) -> torch.Tensor:
    """Uniform [0, 1) draws of ``shape``; with a sequence of generators, row ``i`` comes from generator ``i``."""
    return _draw(torch.rand, shape, generator, device, dtype)


def _per_sample(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A ``(B,)`` tensor shaped to broadcast against ``x`` (B, ...)."""
    return v.reshape(-1, *([1] * (x.dim() - 1)))


def _as_time(t, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=x.dtype if x.is_floating_point() else torch.float32, device=x.device)
    if t.dim() == 0:
        t = t.expand(x.shape[0])
    return t


# --------------------------------------------------------------------------------------------------------------------
# the SDEs
# --------------------------------------------------------------------------------------------------------------------


class SDE(abc.ABC):
    """A forward SDE dx = f(x, t) dt + g(t) dw on t ∈ [0, T] with a discretisation of ``N`` steps."""

    #: short name, used by ``score_fn_from_unet`` and the network builders
    kind: str = ""
    T: float = 1.0

    def __init__(self, N: int, eps: float) -> None:
        if N < 1:
            raise ValueError(f"N must be positive, got {N}")
        self.N = int(N)
        #: the time where sampling ends (and the default lower end of training times for the sampler's grid)
        self.eps = float(eps)

    @abc.abstractmethod
    def sde(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(drift f(x, t) shaped like x, diffusion g(t) of shape (B,))."""

    @abc.abstractmethod
    def marginal_prob(self, x: torch.Tensor, t) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean shaped like x, std of shape (B,)) of p_t(x_t | x_0 = x)."""

    @abc.abstractmethod
    def prior_sampling(self, shape, generator: GeneratorArg = None, device=None, dtype=None) -> torch.Tensor:
        """A draw from the prior p_T."""

    @abc.abstractmethod
    def discretize(self, x: torch.Tensor, t, t_next=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(f shaped like x, G of shape (B,)) of the forward step from grid index(t_next) up to grid index(t)."""

    def timestep_index(self, t: torch.Tensor) -> torch.Tensor:
        """Grid index floor(t (N − 1) / T) as a long tensor, computed in float64 with a 1e-4 tolerance so that a grid
        time rounded to float32 does not fall into the cell below."""
        idx = torch.floor(t.double() / self.T * (self.N - 1) + 1e-4).long()
        return idx.clamp(0, self.N - 1)

    def _indices(self, x: torch.Tensor, t, t_next) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.timestep_index(_as_time(t, x))
        if t_next is None:
            j = i - 1
        else:
            j = torch.minimum(self.timestep_index(_as_time(t_next, x)), i - 1)
        return i, j

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class VESDE(SDE):
    """Variance-exploding SDE: σ(t) = σ_min (σ_max / σ_min)^t, dx = σ(t) sqrt(2 log(σ_max / σ_min)) dw.

    The perturbation kernel is N(x_0, σ(t)² I) (the σ_min² offset at t = 0 is ignored, as in the paper) and the prior
    is N(0, σ_max² I). The discrete noise levels are σ_i = exp(linspace(log σ_min, log σ_max, N))_i.
    """

    kind = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, N: int = 1000, eps: float = 1e-5) -> None:
        super().__init__(N, eps)
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self._discrete_sigmas = torch.exp(
            torch.linspace(math.log(self.sigma_min), math.log(self.sigma_max), self.N, dtype=torch.float64)
        )

    @property
    def discrete_sigmas(self) -> torch.Tensor:
        """The ``N`` noise levels of the discrete chain (float64, CPU)."""
        return self._discrete_sigmas

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def sde(self, x, t):
        t = _as_time(t, x)
        drift = torch.zeros_like(x)
        diffusion = self.sigma(t) * math.sqrt(2.0 * (math.log(self.sigma_max) - math.log(self.sigma_min)))
        return drift, diffusion

    def marginal_prob(self, x, t):
        t = _as_time(t, x)
        return x, self.sigma(t)

    def prior_sampling(self, shape, generator=None, device=None, dtype=None):
        return randn(shape, generator, device, dtype) * self.sigma_max

    def discretize(self, x, t, t_next=None):
        i, j = self._indices(x, t, t_next)
        sigmas = self._discrete_sigmas.to(x.device)
        sigma = sigmas[i]
        sigma_next = torch.where(j >= 0, sigmas[j.clamp_min(0)], torch.zeros_like(sigma))
        f = torch.zeros_like(x)
        G = torch.sqrt(sigma**2 - sigma_next**2).to(x.dtype)
        return f, G

    def langevin_alpha(self, x: torch.Tensor, t) -> torch.Tensor:
        """The factor α of the Langevin corrector's step size: 1 for VE."""
        return torch.ones(x.shape[0], dtype=x.dtype, device=x.device)


class VPSDE(SDE):
    """Variance-preserving SDE: β(t) = β_min + t (β_max − β_min), dx = −½ β(t) x dt + sqrt(β(t)) dw.

    The perturbation kernel is N(a(t) x_0, (1 − a(t)²) I) with log a(t) = −¼ t² (β_max − β_min) − ½ t β_min; the prior
    is N(0, I). The discrete chain is DDPM's: β_i = linspace(β_min / N, β_max / N, N)_i, α_i = 1 − β_i.
    """

    kind = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, N: int = 1000, eps: float = 1e-3) -> None:
        super().__init__(N, eps)
        if not 0.0 <= beta_min < beta_max:
            raise ValueError(f"need 0 <= beta_min < beta_max, got {beta_min}, {beta_max}")
        self.beta_min = float(beta_min)
        self.beta_max = float(beta_max)
        self._discrete_betas = torch.linspace(
            self.beta_min / self.N, self.beta_max / self.N, self.N, dtype=torch.float64
        )
        self._alphas = 1.0 - self._discrete_betas
        self._alphas_cumprod = torch.cumprod(self._alphas, dim=0)

    @property
    def discrete_betas(self) -> torch.Tensor:
        return self._discrete_betas

    @property
    def alphas(self) -> torch.Tensor:
        return self._alphas

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas_cumprod

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def sde(self, x, t):
        t = _as_time(t, x)
        beta_t = self.beta(t)
        drift = -0.5 * _per_sample(beta_t, x) * x
        return drift, torch.sqrt(beta_t)

    def marginal_prob(self, x, t):
        t = _as_time(t, x)
        log_coeff = self.log_mean_coeff(t)
        mean = _per_sample(torch.exp(log_coeff), x) * x
        std = torch.sqrt(-torch.expm1(2.0 * log_coeff))
        return mean, std

    def prior_sampling(self, shape, generator=None, device=None, dtype=None):
        return randn(shape, generator, device, dtype)

    def discretize(self, x, t, t_next=None):
        i, j = self._indices(x, t, t_next)
        if t_next is None:
            a = self._alphas.to(x.device)[i]
        else:
            cum = self._alphas_cumprod.to(x.device)
            cum_next = torch.where(j >= 0, cum[j.clamp_min(0)], torch.ones_like(cum[i]))
            a = cum[i] / cum_next
        f = _per_sample((torch.sqrt(a) - 1.0).to(x.dtype), x) * x
        G = torch.sqrt(1.0 - a).to(x.dtype)
        return f, G

    def langevin_alpha(self, x: torch.Tensor, t) -> torch.Tensor:
        """The factor α of the Langevin corrector's step size: α_i = 1 − β_i at the grid index of ``t``."""
        i = self.timestep_index(_as_time(t, x))
        return self._alphas.to(x.device)[i].to(x.dtype)


#: the parameters of each kind's schedule; ``N`` and ``eps`` are shared
SDE_PARAMETERS = {"ve": ("sigma_min", "sigma_max"), "vp": ("beta_min", "beta_max")}


def make_sde(kind: str, **kwargs) -> SDE:
    """``"ve"`` / ``"vp"`` (any case) -> the SDE with ``kwargs``. ``kwargs`` may hold both kinds' schedules (a config
    switches kind by ``sde.kind`` alone: ``sigma_min``/``sigma_max`` for VE, ``beta_min``/``beta_max`` for VP); the
    other kind's are left out. Any other unknown keyword is an error."""
    kinds = {"ve": VESDE, "vp": VPSDE}
    chosen = str(kind).lower()
    if chosen not in kinds:
        raise ConfigError(f"unknown SDE kind {kind!r} (model.sde.kind); expected one of {sorted(kinds)}")
    other = {name for k, names in SDE_PARAMETERS.items() if k != chosen for name in names}
    return kinds[chosen](**{k: v for k, v in kwargs.items() if k not in other})


# --------------------------------------------------------------------------------------------------------------------
# denoising score matching
# --------------------------------------------------------------------------------------------------------------------


def dsm_loss(
    score_fn: ScoreFn,
    x0: torch.Tensor,
    sde: SDE,
    generator: GeneratorArg = None,
    eps: float = 1e-5,
    likelihood_weighting: bool = False,
    reduce_mean: bool = True,
) -> torch.Tensor:
    """Denoising score-matching loss of ``score_fn`` on a batch ``x0`` (diffusion range).

    t ~ U(eps, T) per sample, z ~ N(0, I), x_t = mean(x0, t) + std(t) z. The per-element loss is
    λ(t) ‖s_θ(x_t, t) + z / std‖² with λ(t) = std² (i.e. ‖std · s_θ + z‖²), or with ``likelihood_weighting`` the
    likelihood weighting λ(t) = g(t)². Each sample's loss is the mean (``reduce_mean``) or the sum over its elements;
    the result is the batch mean. ``t`` is drawn before ``z`` from each generator.
    """
    batch = x0.shape[0]
    t = rand((batch,), generator, device=x0.device, dtype=x0.dtype) * (sde.T - eps) + eps
    z = randn(x0.shape, generator, device=x0.device, dtype=x0.dtype)
    mean, std = sde.marginal_prob(x0, t)
    std_b = _per_sample(std, x0)
    x_t = mean + std_b * z
    score = score_fn(x_t, t)
    if likelihood_weighting:
        g2 = sde.sde(torch.zeros_like(x0), t)[1] ** 2
        losses = (score + z / std_b) ** 2 * _per_sample(g2, x0)
    else:
        losses = (score * std_b + z) ** 2
    losses = losses.reshape(batch, -1)
    losses = losses.mean(dim=1) if reduce_mean else losses.sum(dim=1)
    return losses.mean()


# --------------------------------------------------------------------------------------------------------------------
# score networks (diffusers UNet2DModel)
# --------------------------------------------------------------------------------------------------------------------


def _time_embedding_type(model) -> str | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if isinstance(config, dict):
        return config.get("time_embedding_type")
    return getattr(config, "time_embedding_type", None)


def _output(out) -> torch.Tensor:
    return out.sample if hasattr(out, "sample") else out


def score_fn_from_unet(unet: Callable, sde: SDE) -> ScoreFn:
    """``score_fn(x, t)`` from a network ``unet(x, timestep)`` (a diffusers ``UNet2DModel`` or any callable returning a
    tensor or an object with ``.sample``). See the module docstring for the VE / VP time conditioning.

    The network's train / eval mode and the grad mode are the caller's.
    """
    embedding = _time_embedding_type(unet)
    if sde.kind == "ve":

        def score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t = _as_time(t, x)
            sigma = sde.marginal_prob(torch.zeros_like(x), t)[1]
            out = _output(unet(x, sigma))
            if embedding == "fourier":
                return out  # UNet2DModel already divided its output by the timestep σ
            return out / _per_sample(sigma, x)

    elif sde.kind == "vp":
        if embedding == "fourier":
            raise ValueError(
                "a VP score network must not use the Fourier time embedding: diffusers' UNet2DModel divides a Fourier "
                "model's output by the timestep; build it with time_embedding_type='positional'"
            )

        def score_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            t = _as_time(t, x)
            std = sde.marginal_prob(torch.zeros_like(x), t)[1]
            out = _output(unet(x, t * (sde.N - 1)))
            return -out / _per_sample(std, x)

    else:
        raise ValueError(f"no score-network convention for SDE kind {sde.kind!r}")
    return score_fn


def _embedding_for(sde_type: str) -> str:
    kind = sde_type.lower()
    if kind == "ve":
        return "fourier"
    if kind == "vp":
        return "positional"
    raise ValueError(f"unknown SDE kind {sde_type!r}; expected 've' or 'vp'")


def score_unet(
    sde_type: str,
    image_size: int,
    channels: int = 3,
    block_out_channels: Sequence[int] = (128, 256, 256, 256),
    layers_per_block: int = 2,
    attn_resolutions: Sequence[int] = (16,),
    dropout: float = 0.1,
    norm_num_groups: int = 32,
    attention_head_dim: int | None = None,
    **kwargs,
):
    """A diffusers ``UNet2DModel`` score network for ``sde_type`` ("ve": Fourier time embedding, "vp": sinusoidal).

    The defaults follow the CIFAR-10 NCSN++ / DDPM++ sizes (channel multipliers 1, 2, 2, 2 of 128, two residual
    blocks per level, attention at 16×16, dropout 0.1). Attention is put in every level whose feature-map size is in
    ``attn_resolutions``. ``kwargs`` go to ``UNet2DModel``. Buildable from config by ``_target_``.
    """
    from diffusers import UNet2DModel

    block_out_channels = tuple(int(c) for c in block_out_channels)
    resolutions = [image_size // (2**level) for level in range(len(block_out_channels))]
    attn = {int(r) for r in attn_resolutions}
    down = tuple("AttnDownBlock2D" if r in attn else "DownBlock2D" for r in resolutions)
    up = tuple("AttnUpBlock2D" if r in attn else "UpBlock2D" for r in reversed(resolutions))
    return UNet2DModel(
        sample_size=image_size,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        time_embedding_type=_embedding_for(sde_type),
        dropout=dropout,
        norm_num_groups=norm_num_groups,
        attention_head_dim=attention_head_dim,
        **kwargs,
    )


def tiny_score_unet(sde_type: str, image_size: int = 8, channels: int = 3, **kwargs):
    """A tiny randomly initialised ``UNet2DModel`` of the same family as ``score_unet`` (for debug runs and tests):
    two levels of 16 and 32 channels, one residual block each, attention at the lower level."""
    defaults = {
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "attn_resolutions": (max(image_size // 2, 1),),
        "dropout": 0.0,
        "norm_num_groups": 8,
        "attention_head_dim": 8,
    }
    defaults.update(kwargs)
    return score_unet(sde_type, image_size, channels, **defaults)
