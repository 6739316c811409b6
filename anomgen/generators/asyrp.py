"""Asyrp anomalies (Kwon et al. 2023; the synthetic-validation paper's appendix A.3): a learned h-space edit of a
frozen DDIM.

A small network f_θ(h, t) (:class:`DeltaH`) predicts Δh, which is added to the UNet's middle-block output for every
timestep t ≥ ``t_edit``: h' = h + α·f_θ(h, t), α the edit strength.

Training (:meth:`Asyrp.training_losses`), as Asyrp_official's ``run_training`` does it. Each source image x (a normal
support image) is inverted once with deterministic DDIM (:meth:`Asyrp.invert`); from its x_T two trajectories run down
through every timestep t ≥ ``t_edit``: the unedited DDIM one (fixed, so its predictions P_t(ε) are computed once, by
:meth:`Asyrp.prepare`) and the edited one, which takes the asymmetric step with the current Δh. At each t, ε̃ (h + Δh)
at the edited state x_t gives x̂_0 = P_t(ε̃) and

    loss_t = λ_clip · mean(1 − cos(E_I(x̂_0) − E_I(x), E_T(y) − E_I(x))) + λ_l1 · mean |x̂_0 − P_t(ε(x_t^plain))|,

a directional CLIP loss with no source text (the source's image embedding stands in for it), y the target text
(``{class}`` in it is replaced by the sample's category), plus an L1 term that keeps x̂_0 near the unedited
trajectory's prediction. The caller takes one optimizer step per t (the reference's ``optim_ft.step()`` inside its
loop over t); the next edited state is computed in the same pass, with Δh as it was before that step, and detached.
Only θ trains; the UNet and CLIP stay frozen. Nothing in training is random (η = 0 throughout).

Generation (:meth:`Asyrp.generate`): from the source's x_T, DDIM with the asymmetric step for t ≥ ``t_edit`` (P_t from
ε̃ with h + α·Δh, the direction from ε), plain steps below, optional quality boosting (stochastic steps for
t ≤ ``t_boost``, each sample's noise from its own generator).

``clip`` is any object with ``encode_images(images in [0, 1]) -> B × D`` (L2-normalised, differentiable with respect
to the images) and ``encode_texts(list[str]) -> N × D`` (L2-normalised); :class:`OpenCLIPGuide` is one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from anomgen.diffusion.ddim import DDIMSchedule, EpsModel, ddim_invert, ddim_step, predict_x0
from anomgen.diffusion.hspace import HSpace, edited_generation, eps_and_edited_eps
from anomgen.pixels import from_diffusion_range, to_diffusion_range

CLASS_PLACEHOLDER = "{class}"


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t·f_i), sin(t·f_i)], f_i = max_period^(−i / (dim/2)); B -> B × dim (dim even)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class OpenCLIPGuide(nn.Module):
    """An open_clip model as the CLIP guide of the loss: ``encode_images`` keeps gradients (resized to the model's
    input size, normalised with its own statistics), ``encode_texts`` does not need them.

    ``pretrained`` is an open_clip tag (``"openai"``: the QuickGELU twin of the config is used), a weights file or
    ``None`` (random weights); weights are found and loaded strictly by
    :class:`~anomgen.encoders.clip.OpenCLIPImageEncoder`.
    """

    def __init__(self, model_name: str = "ViT-B-16", pretrained: str | None = "openai") -> None:
        super().__init__()
        from anomgen.encoders.clip import OpenCLIPImageEncoder

        self.encoder = OpenCLIPImageEncoder(model_name, pretrained)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings (B × D, float32) of [0, 1] RGB images, differentiable in the images."""
        return self.encoder.embed(images)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised embeddings (N × D, float32) of ``texts``."""
        return self.encoder.embed_texts(texts)


class DeltaH(nn.Module):
    """Δh = f_θ(h, t): 1×1 conv → + linear(sinusoid(t)) → GroupNorm → SiLU → 1×1 conv.

    The last convolution starts at zero, so Δh = 0 (no edit) before training. Runs in its own dtype and returns Δh in
    h's dtype.
    """

    def __init__(self, channels: int, hidden_channels: int | None = None, time_embed_dim: int = 128,
                 num_groups: int = 32) -> None:
        super().__init__()
        if time_embed_dim % 2:
            raise ValueError(f"time_embed_dim must be even, got {time_embed_dim}")
        hidden = hidden_channels or channels
        self.time_embed_dim = time_embed_dim
        self.conv_in = nn.Conv2d(channels, hidden, kernel_size=1)
        self.time_proj = nn.Linear(time_embed_dim, hidden)
        self.norm = nn.GroupNorm(math.gcd(num_groups, hidden), hidden)
        self.conv_out = nn.Conv2d(hidden, channels, kernel_size=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, h: torch.Tensor, t: int) -> torch.Tensor:
        dtype = self.conv_in.weight.dtype
        emb = timestep_embedding(torch.full((h.shape[0],), float(t), device=h.device), self.time_embed_dim)
        z = self.conv_in(h.to(dtype)) + self.time_proj(emb.to(dtype))[:, :, None, None]
        return self.conv_out(F.silu(self.norm(z))).to(h.dtype)


class Asyrp(nn.Module):
    """A frozen ε-prediction UNet (diffusers ``UNet2DModel``), its DDIM schedule, a frozen CLIP and the trainable
    :class:`DeltaH` (the only parameters that require gradients).

    Images come in as [0, 1] RGB of any size; they are resized to the UNet's ``sample_size`` (or ``image_size``).
    ``h_channels`` (the middle block's width) defaults to ``unet.config.block_out_channels[-1]``.
    """

    def __init__(self, unet: nn.Module, clip, schedule: DDIMSchedule, target_text: str = "a photo of something strange",
                 t_edit: int = 500, lambda_clip: float = 1.0, lambda_l1: float = 3.0,
                 hidden_channels: int | None = None, time_embed_dim: int = 128, t_boost: int = -1,
                 eta_boost: float = 1.0, h_channels: int | None = None, image_size: int | None = None) -> None:
        super().__init__()
        config = getattr(unet, "config", None)
        if h_channels is None:
            widths = getattr(config, "block_out_channels", None)
            if not widths:
                raise ValueError(f"cannot read the h-space width of a {type(unet).__name__} (no "
                                 "config.block_out_channels); pass h_channels")
            h_channels = int(widths[-1])
        size = image_size or getattr(config, "sample_size", None)
        if size is None:
            raise ValueError(f"cannot read the input size of a {type(unet).__name__} (no config.sample_size); "
                             "pass image_size")
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        in_channels = getattr(config, "in_channels", 3)
        if in_channels != 3:
            raise ValueError(f"Asyrp edits RGB images (CLIP guides them); the UNet takes {in_channels} channels")
        edit_timesteps = [t for t in schedule.timesteps if t >= t_edit]
        if not edit_timesteps:
            raise ValueError(f"t_edit={t_edit} is above every DDIM timestep (the largest is {schedule.timesteps[0]}); "
                             "no step would be edited")

        unet.eval().requires_grad_(False)
        self.eps_model = EpsModel(unet)
        self.hspace = HSpace(unet)
        if isinstance(clip, nn.Module):
            clip.eval().requires_grad_(False)
        self.clip = clip
        self.schedule = schedule
        self.t_edit = int(t_edit)
        self.edit_timesteps = edit_timesteps  # descending: the timesteps Δh acts at (and trains at)
        self.target_text = target_text
        self.lambda_clip, self.lambda_l1 = float(lambda_clip), float(lambda_l1)
        self.t_boost, self.eta_boost = int(t_boost), float(eta_boost)
        self.delta_h = DeltaH(h_channels, hidden_channels, time_embed_dim)
        self._text_embeddings: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True) -> Asyrp:
        """Only :class:`DeltaH` switches mode; the frozen UNet and CLIP stay in eval mode."""
        super().train(mode)
        self.eps_model.eval()
        if isinstance(self.clip, nn.Module):
            self.clip.eval()
        return self

    # -- inputs ----------------------------------------------------------------------------------------------------
    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] RGB images at the UNet's input size."""
        if images.shape[1] != 3:
            raise ValueError(f"Asyrp expects B × 3 × H × W RGB images, got shape {tuple(images.shape)}")
        if tuple(images.shape[-2:]) == self.image_size:
            return images
        return F.interpolate(images, size=self.image_size, mode="bilinear", antialias=True,
                             align_corners=False).clamp(0.0, 1.0)

    def target_texts(self, categories: Sequence[str] | None, batch_size: int) -> list[str]:
        """The target text of each sample, ``{class}`` replaced by its category."""
        if CLASS_PLACEHOLDER not in self.target_text:
            return [self.target_text] * batch_size
        if categories is None or len(categories) != batch_size:
            raise ValueError(f"the target text {self.target_text!r} names {CLASS_PLACEHOLDER}: give one category "
                             f"per sample ({batch_size})")
        return [self.target_text.replace(CLASS_PLACEHOLDER, str(c)) for c in categories]

    @torch.no_grad()
    def text_embeddings(self, texts: Sequence[str], device: torch.device) -> torch.Tensor:
        """E_T of each text (each distinct text encoded once and kept)."""
        new = [t for t in dict.fromkeys(texts) if t not in self._text_embeddings]
        if new:
            for text, emb in zip(new, self.clip.encode_texts(new)):
                self._text_embeddings[text] = emb.detach()
        return torch.stack([self._text_embeddings[t] for t in texts]).to(device=device, dtype=torch.float32)

    # -- the algorithm ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def invert(self, images: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM inversion of [0, 1] images: their x_T (B × 3 × H × W, diffusion range)."""
        return ddim_invert(self.eps_model, to_diffusion_range(self.resize(images)), self.schedule)

    @torch.no_grad()
    def unedited_predictions(self, x_T: torch.Tensor) -> torch.Tensor:
        """P_t(ε(x_t, t)) along the unedited DDIM trajectory from ``x_T``, at each edit timestep: B × K × 3 × H × W
        (column k at ``edit_timesteps[k]``), the targets of the L1 term."""
        x, predictions = x_T, []
        for t, t_next in self.schedule.generation_pairs():
            if t < self.t_edit:
                break
            eps = self.eps_model(x, t)
            predictions.append(predict_x0(x, eps, self.schedule.alpha_bar(t)))
            x = ddim_step(x, eps, self.schedule.alpha_bar(t), self.schedule.alpha_bar(t_next))
        return torch.stack(predictions, dim=1)

    @torch.no_grad()
    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """What training needs of each source image, computed once: B × (1 + K) × 3 × H × W, column 0 its x_T
        (where generation starts too), column 1 + k the unedited prediction at ``edit_timesteps[k]``."""
        x_T = self.invert(images)
        return torch.cat([x_T[:, None], self.unedited_predictions(x_T)], dim=1)

    def training_losses(self, images: torch.Tensor, sources: torch.Tensor,
                        categories: Sequence[str] | None = None
                        ) -> Iterator[tuple[int, torch.Tensor, dict[str, torch.Tensor]]]:
        """Walk the edited trajectory from x_T down through every t ≥ ``t_edit`` (descending), yielding
        ``(t, loss_t, {"clip", "l1"})`` at each; take the optimizer step before asking for the next one.
        ``images``: the sources in [0, 1]; ``sources``: their :meth:`prepare` tensors."""
        x = sources[:, 0]
        with torch.no_grad():
            source = self.clip.encode_images(self.resize(images)).float()
            direction = self.text_embeddings(self.target_texts(categories, len(images)), source.device) - source
        pairs = dict(self.schedule.generation_pairs())
        for k, t in enumerate(self.edit_timesteps):
            alpha_bar = self.schedule.alpha_bar(t)
            eps, eps_edited = eps_and_edited_eps(self.eps_model, self.hspace, x, t,
                                                 lambda h, t=t: h + self.delta_h(h, t))
            x0_edited = predict_x0(x, eps_edited, alpha_bar)
            edited = self.clip.encode_images(from_diffusion_range(x0_edited)).float()
            loss_clip = (1.0 - F.cosine_similarity(edited - source, direction, dim=-1)).mean()
            loss_l1 = (x0_edited - sources[:, 1 + k]).abs().mean()
            loss = self.lambda_clip * loss_clip + self.lambda_l1 * loss_l1
            # the next edited state, from this pass (Δh before the caller's step), as the reference computes it
            x_next = ddim_step(x, eps_edited, alpha_bar, self.schedule.alpha_bar(pairs[t]), eps_direction=eps)
            yield t, loss, {"clip": loss_clip.detach(), "l1": loss_l1.detach()}
            x = x_next.detach()

    @torch.no_grad()
    def generate(self, x_T: torch.Tensor, alphas: torch.Tensor | Sequence[float],
                 generators: Sequence[torch.Generator] | None = None) -> torch.Tensor:
        """Edited images in [0, 1] from x_T (diffusion range), sample i edited with strength ``alphas[i]``;
        ``generators`` (one per sample) are needed when boosting is on (``t_boost`` ≥ 0)."""
        alphas = torch.as_tensor(alphas, dtype=x_T.dtype, device=x_T.device).flatten()
        if len(alphas) != len(x_T):
            raise ValueError(f"{len(alphas)} edit strengths for a batch of {len(x_T)}")
        if self.t_boost >= 0 and generators is None:
            raise ValueError(f"quality boosting (t_boost={self.t_boost}) draws noise: pass one torch.Generator per "
                             "sample (seeded by its global index)")
        strength = alphas.view(-1, 1, 1, 1)

        def edit(t: int, h: torch.Tensor) -> torch.Tensor:
            return h + strength.to(h.dtype) * self.delta_h(h, t)

        x0 = edited_generation(self.eps_model, self.hspace, x_T, self.schedule, edit, self.t_edit,
                               t_boost=self.t_boost, eta_boost=self.eta_boost, generators=generators)
        return from_diffusion_range(x0)
