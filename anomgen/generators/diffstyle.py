"""DiffStyle anomalies for synthetic validation: h-space mixing of two normal images in a frozen DDIM.

The whole algorithm, given a frozen ε-prediction UNet (guided-diffusion's ImageNet model, any diffusers
``UNet2DModel``, or a small DDPM trained here on disjoint data):

1. The support set is split at random into X_style, X_content and held-out normals X_in
   (:class:`DiffStylePlan`, built on :func:`anomgen.data.tasks.split_support`).
2. Every style and content image is inverted **once** with deterministic DDIM (η = 0); the style image's x_T is
   kept, and so is the content image's h_t = h(x_t, t) (the UNet middle-block output at the content's inversion
   state x_t, with the label t of that same level) at every timestep t ≥ t_edit (:meth:`DiffStyle.invert`). This is
   InjectFusion's convention (``precompute_pairs_with_h`` keeps the h of the call at level i under key i; generation
   at label i injects the h of key i). Inversion calls the UNet at every timestep but the top one (see
   :mod:`anomgen.diffusion.ddim`); the content's h at the top timestep T comes from one more call, h(x_T, T), where
   InjectFusion falls back to the nearest stored h (that of the level below).
3. Each (style, content) pair of the cross product makes one anomaly, generated from the style x_T
   (:meth:`DiffStyle.generate`, through :func:`anomgen.diffusion.hspace.edited_generation`):
   - t ≥ t_edit: h replaced by h_gen = (1 − γ) h_style + γ h_content (``mix="lerp"``, γ = 0.7) or by the slerp of
     the two with the content h rescaled to the style h's norm (``mix="slerp"``), and the asymmetric step
     x_{t−1} = √ᾱ_{t−1} P_t(ε̃) + √(1 − ᾱ_{t−1}) ε (ε̃ from the mixed h, ε from the trajectory's own h);
   - t_boost < t < t_edit: plain deterministic DDIM;
   - t ≤ t_boost: quality boosting, stochastic DDIM steps (η = 1) without injection, each sample's noise drawn from
     a generator seeded by its global index.

Sample ``i`` of an S × C set is the pair (style ``i // C``, content ``i % C``); the held-out normals follow as
samples S·C, S·C + 1, ... (label 0), so that the set is a validation set on its own. The cost is the minimum:
S + C inversions (n − 1 UNet calls each, plus one for a content image's h at the top timestep) and S·C
generations (n calls each; a step with t ≥ t_edit is one UNet pass over a batch of 2).

The hyperparameters (steps, t_edit, t_boost, γ, mix, η_boost, the noise schedule) are declared once, with the paper's
defaults, by :class:`DiffStyleConfig`; the Lightning wrapper forwards its keyword arguments to it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from torch.utils.data import Dataset

from anomgen.data.record import GOOD
from anomgen.diffusion.ddim import DDIMSchedule, EpsModel, ddim_invert
from anomgen.diffusion.hspace import MIX_MODES, HSpace, edited_generation, mix_h
from anomgen.pixels import from_diffusion_range, to_diffusion_range

NAME = "diffstyle"


@dataclass
class Inversion:
    """One image's DDIM inversion: its x_T and its h at each timestep t ≥ t_edit (diffusion range)."""

    x_T: torch.Tensor
    h: dict[int, torch.Tensor] = field(default_factory=dict)


class CountingEps(nn.Module):
    """An ε-model that counts UNet evaluations (images passed through the network) for the cost benchmarks."""

    def __init__(self, eps_model: nn.Module) -> None:
        super().__init__()
        self.eps_model = eps_model
        self.evaluations = 0

    def forward(self, x: torch.Tensor, t: int) -> torch.Tensor:
        self.evaluations += x.shape[0]
        return self.eps_model(x, t)


@dataclass(frozen=True)
class DiffStyleConfig:
    """DiffStyle's hyperparameters, declared once; the defaults are the paper's (50 DDIM steps over the linear
    1e-4 → 0.02 schedule of 1000 steps, on the reference grid 999, 978, ..., 0; h mixed at t ≥ 400 with γ = 0.7 by
    lerp, quality boosting at t ≤ 200).
    The wrapper (``models.diffstyle.DiffStyleModel``) forwards its keyword arguments here."""

    num_inference_steps: int = 50
    t_edit: int = 400
    t_boost: int = 200  # -1: no quality boosting
    gamma: float = 0.7
    mix: str = "lerp"  # "lerp" (the paper) | "slerp" (DiffStyle: content h rescaled to the style h's norm)
    eta_boost: float = 1.0
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: str = "linear"

    def __post_init__(self) -> None:
        if self.mix not in MIX_MODES:
            raise ValueError(f"diffstyle: mix must be one of {MIX_MODES}, got {self.mix!r}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"diffstyle: gamma must be in [0, 1], got {self.gamma}")
        if self.t_boost >= self.t_edit:
            raise ValueError(f"diffstyle: t_boost ({self.t_boost}) must be below t_edit ({self.t_edit})")


#: the paper's partition of the support set: 10 style × 10 content images (5 × 5 for Flowers)
N_STYLE = N_CONTENT = 10


class DiffStyle:
    """Invert once, mix h, generate: see the module docstring. ``unet`` stays frozen.

    ``DiffStyle(unet, config)`` or ``DiffStyle(unet, t_edit=300, ...)`` (keyword arguments override ``config``'s
    fields, see :class:`DiffStyleConfig`)."""

    name = NAME

    def __init__(self, unet: nn.Module, config: DiffStyleConfig | None = None, **overrides) -> None:
        config = replace(config or DiffStyleConfig(), **overrides)
        self.config = config
        self.unet = unet.eval().requires_grad_(False)
        self.schedule = DDIMSchedule(config.num_inference_steps, config.num_train_timesteps, config.beta_start,
                                     config.beta_end, config.beta_schedule)
        if config.t_edit > max(self.schedule.timesteps):
            raise ValueError(f"diffstyle: t_edit={config.t_edit} is above every timestep of the schedule "
                             f"(max {max(self.schedule.timesteps)}); h would never be mixed")
        self.eps = CountingEps(EpsModel(self.unet))
        self.hspace = HSpace(self.unet)
        self.t_edit, self.t_boost, self.gamma = config.t_edit, config.t_boost, config.gamma
        self.mix, self.eta_boost = config.mix, config.eta_boost

    @property
    def params(self) -> dict:
        """The parameters every sample's manifest row records."""
        return {"gamma": self.gamma, "mix": self.mix, "t_edit": self.t_edit, "t_boost": self.t_boost,
                "num_inference_steps": len(self.schedule.timesteps)}

    @torch.no_grad()
    def invert(self, images: torch.Tensor, keep_h: bool = True) -> list[Inversion]:
        """DDIM-invert a batch of [0, 1] images; ``keep_h`` keeps h_t = h(x_t, t) at every t ≥ t_edit (content
        images need it): the h of the inversion's call at level t, and one more call at x_T for the top t."""
        device = next(self.unet.parameters()).device
        hs: dict[int, torch.Tensor] = {}

        def keep(t: int, x: torch.Tensor) -> None:  # called after the UNet call at (x_t, t)
            if keep_h and t >= self.t_edit:
                hs[t] = self.hspace.h.detach().clone()

        x_T = ddim_invert(self.eps, to_diffusion_range(images.to(device)), self.schedule, on_step=keep)
        if keep_h:
            top = self.schedule.timesteps[0]
            self.eps(x_T, top)
            keep(top, x_T)
        return [Inversion(x_T[i], {t: h[i] for t, h in hs.items()}) for i in range(images.shape[0])]

    @torch.no_grad()
    def generate(self, styles: Sequence[Inversion], contents: Sequence[Inversion],
                 generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """One anomaly per (styles[i], contents[i]) pair, as [0, 1] images. ``generators`` (one per sample) are
        needed when quality boosting is on."""
        if len(styles) != len(contents):
            raise ValueError(f"diffstyle: {len(styles)} style and {len(contents)} content inversions; pair them 1:1")
        missing = [t for t in self._edit_timesteps() if any(t not in c.h for c in contents)]
        if missing:
            raise ValueError(f"diffstyle: content inversions lack h at timesteps {missing[:5]}; invert them with "
                             "keep_h=True and the same schedule and t_edit")
        x_T = torch.stack([s.x_T for s in styles])
        h_content = {t: torch.stack([c.h[t] for c in contents]) for t in self._edit_timesteps()}

        def edit(t: int, h: torch.Tensor) -> torch.Tensor:
            return mix_h(h, h_content[t].to(h), self.gamma, self.mix)

        x0 = edited_generation(self.eps, self.hspace, x_T, self.schedule, edit, self.t_edit, self.t_boost,
                               self.eta_boost, generators)
        return from_diffusion_range(x0)

    def _edit_timesteps(self) -> list[int]:
        return [t for t in self.schedule.timesteps if t >= self.t_edit]

    def cross_product(self, style_images: torch.Tensor, content_images: torch.Tensor, seed: int,
                      batch_size: int = 16, start_index: int = 0) -> Iterator[tuple[list[int], torch.Tensor]]:
        """All S × C anomalies in batches: ``(global indices, images)``; each image is inverted once."""
        from anomgen.seeding import sample_generator

        styles = self.invert(style_images, keep_h=False)
        contents = self.invert(content_images, keep_h=True)
        n_content = len(contents)
        total = len(styles) * n_content
        for lo in range(0, total, batch_size):
            indices = list(range(lo, min(lo + batch_size, total)))
            generators = [sample_generator(seed, start_index + i) for i in indices]
            images = self.generate([styles[i // n_content] for i in indices],
                                   [contents[i % n_content] for i in indices], generators)
            yield [start_index + i for i in indices], images

    def close(self) -> None:
        """Remove the h-space hook from the UNet."""
        self.hspace.remove()


class DiffStylePlan(Dataset):
    """The generation requests of a DiffStyle validation set over a support set.

    Request ``i < S·C`` is the anomaly of pair (style ``i // C``, content ``i % C``); request ``S·C + j`` passes the
    held-out normal ``j`` through (label 0). Each request is ``{"index", "style", "content", "held_out"}`` (positions in
    the three parts, -1 where not used); the parts are :attr:`style`, :attr:`content`, :attr:`held_out`.
    """

    def __init__(self, support: Dataset, n_style: int, n_content: int, n_held_out: int | None = None,
                 seed: int = 0) -> None:
        from anomgen.data.tasks import TaskView, split_support

        needed = n_style + n_content + (n_held_out or 1)
        if len(support) < needed:
            raise ValueError(f"diffstyle: the support set has {len(support)} images; the partition needs {needed} "
                             f"({n_style} style + {n_content} content + {n_held_out or 'at least 1'} held-out)")
        self.style, self.content, rest = split_support(support, n_style, n_content, seed=seed)
        n_held_out = len(rest) if n_held_out is None else n_held_out
        self.held_out = TaskView(rest, range(n_held_out), name="held-out")
        #: support images in no part of the set (with ``n_held_out`` below the rest): a detector's bank may use them
        self.unused = TaskView(rest, range(n_held_out, len(rest)), name="unused")
        self.n_pairs = n_style * n_content
        self.seed, self.support_size = seed, len(support)
        self._style_entries, self._content_entries = self.style.entries, self.content.entries

    def anomaly_fields(self, index: int) -> dict:
        """``category`` (the style image's) and ``sources`` (style, content image paths) of anomaly ``index``, read
        from the entries without loading pixels."""
        style = self._style_entries[index // len(self._content_entries)]
        content = self._content_entries[index % len(self._content_entries)]
        return {"category": style.category, "sources": [style.image_path, content.image_path]}

    @property
    def split(self) -> dict:
        """The split's sizes and seed, as the set records them (``set.json``: ``split``)."""
        return {"n_style": len(self.style), "n_content": len(self.content), "n_held_out": len(self.held_out),
                "split_seed": self.seed, "support_size": self.support_size}

    def image_size(self) -> tuple[int, int]:
        """The task's image size (the held-out normals'): every set of the task is exported at it."""
        return tuple(self.held_out[0]["image"].shape[-2:])

    def held_out_sample(self, index: int) -> dict:
        """Request ``index >= S·C`` as a sample of :meth:`GeneratedBatch.from_samples`: held-out normal
        ``index - S·C``, passed through unchanged (label 0). Every set of the task writes these same rows."""
        if not self.n_pairs <= index < len(self):
            raise IndexError(f"request {index} is not a held-out normal (they are {self.n_pairs} .. {len(self) - 1})")
        normal = self.held_out[index - self.n_pairs]
        return {"index": index, "image": normal["image"], "label": 0, "category": normal["category"],
                "defect_type": GOOD, "sources": [normal["image_path"]], "params": {"role": "held_out"}}

    def __len__(self) -> int:
        return self.n_pairs + len(self.held_out)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        n_content = len(self.content)
        if index < self.n_pairs:
            return {"index": index, "style": index // n_content, "content": index % n_content, "held_out": -1}
        return {"index": index, "style": -1, "content": -1, "held_out": index - self.n_pairs}
