"""A small ε-prediction DDPM (Ho et al. 2020), trained here when no pretrained diffusion model can be had.

Synthetic validation edits a *frozen* diffusion model that was trained on data other than the task (the paper's is
guided-diffusion's ImageNet model). Offline, :func:`ensure_ddpm` trains a small ``UNet2DModel`` on a shipped dataset
disjoint from the task (sklearn digits for Animal-MNIST tasks, by default) with the DDPM schedule that DDIM then
samples (linear betas 1e-4 → 0.02, T = 1000), and saves it as a diffusers folder that
:func:`anomgen.diffusion.unets.load_diffusion_unet` reads. Later runs reuse the folder. In a pipeline the same training
runs as a stage (``model=ddpm``, ``models/ddpm.py``), whose ``unet`` output later stages load.

    python -m anomgen.diffusion.ddpm --dataset digits --image-size 28 --steps 1500 --out .cache/ddpm/digits_28
"""

from __future__ import annotations

import argparse
import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from anomgen.diffusion.ddim import DEFAULT_BETAS
from anomgen.pixels import to_diffusion_range

#: a small UNet for 28×28 / 32×32 grey images (about 2 M parameters)
SMALL_UNET = {"block_out_channels": (32, 64, 64), "layers_per_block": 1, "attn_resolutions": (7, 8),
              "dropout": 0.0, "norm_num_groups": 8, "attention_head_dim": 16}


def alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                   beta_schedule: str = "linear") -> torch.Tensor:
    """ᾱ_t of the training schedule (the same table :class:`anomgen.diffusion.ddim.DDIMSchedule` uses)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                         beta_schedule=beta_schedule).alphas_cumprod.float()


def ddpm_loss(unet: nn.Module, x0: torch.Tensor, alpha_bars: torch.Tensor,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """E_t,ε ‖ε − ε_θ(√ᾱ_t x_0 + √(1 − ᾱ_t) ε, t)‖², t uniform over the training timesteps; ``x0`` in [-1, 1]."""
    batch = x0.shape[0]
    t = torch.randint(0, len(alpha_bars), (batch,), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    a = alpha_bars.to(x0.device)[t].view(-1, 1, 1, 1)
    pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t)
    return F.mse_loss(getattr(pred, "sample", pred), noise)


def train_ddpm(unet: nn.Module, images: torch.Tensor, steps: int, batch_size: int = 64, lr: float = 2e-4,
               ema_decay: float = 0.999, seed: int = 0, progress: bool = True,
               schedule: Mapping | None = None) -> tuple[nn.Module, list[float]]:
    """Train ``unet`` on ``images`` (N × C × H × W in [0, 1]) for ``steps`` Adam steps; returns (the EMA copy of the
    weights, in eval mode, the loss per step)."""
    from anomgen.progress import progress as progress_bar

    if images.dim() != 4 or len(images) == 0:
        raise ValueError(f"train_ddpm needs a non-empty N×C×H×W image tensor, got shape {tuple(images.shape)}")
    gen = torch.Generator().manual_seed(seed)
    alpha_bars = alphas_cumprod(**{**DEFAULT_BETAS, **(schedule or {})})
    data = to_diffusion_range(images)
    unet.train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    optimizer = torch.optim.Adam(unet.parameters(), lr=lr)
    losses = []
    for _ in progress_bar(range(steps), desc="DDPM training", enabled=progress):
        batch = data[torch.randint(0, len(data), (min(batch_size, len(data)),), generator=gen)]
        loss = ddpm_loss(unet, batch, alpha_bars, gen)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"DDPM training: loss is {loss.item()} at step {len(losses)}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters()):
                p_ema.lerp_(p, 1.0 - ema_decay)
        losses.append(loss.item())
    return ema, losses


def ddpm_unet(image_size: int, channels: int = 3, **sizes):
    """The ε-network: a diffusers ``UNet2DModel`` with sinusoidal time embedding, :data:`SMALL_UNET` by default."""
    from anomgen.diffusion.sde import score_unet

    cfg = {**SMALL_UNET, **sizes}
    return score_unet("vp", image_size, channels, **cfg)


def ensure_ddpm(out: str | Path, dataset: str = "digits", image_size: int = 28, steps: int = 1500,
                batch_size: int = 32, lr: float = 1e-3, exclude_classes: Sequence[str] = (),
                max_images: int | None = None, seed: int = 0, ema_decay: float = 0.995,
                unet: Mapping | None = None) -> str:
    """The DDPM folder ``out``, training it first on ``dataset``'s training split when it does not exist.

    Returns the folder as a string (for a ``source`` key of :func:`load_diffusion_unet` in configs).
    """
    from anomgen.data.shipped import load_images, make_dataset
    from anomgen.diffusion.unets import save_diffusion_unet
    from anomgen.pixels import resize

    out = Path(out)
    if (out / "config.json").is_file():
        return str(out)
    images, _, _ = load_images(make_dataset(dataset, "train"), exclude_classes, max_images, seed)
    images = resize(images, (image_size, image_size)).clamp(0, 1)
    model = ddpm_unet(image_size, images.shape[1], **dict(unet or {}))
    ema, losses = train_ddpm(model, images, steps, batch_size, lr, ema_decay=ema_decay, seed=seed)
    tmp = out.with_name(f".{out.name}.tmp")
    save_diffusion_unet(ema, tmp)
    (tmp / "anomgen_training.json").write_text(json.dumps({
        "dataset": dataset, "split": "train", "exclude_classes": list(exclude_classes), "num_images": len(images),
        "image_size": image_size, "steps": steps, "batch_size": batch_size, "lr": lr, "ema_decay": ema_decay,
        "seed": seed,
        "final_loss_mean_last_100": sum(losses[-100:]) / len(losses[-100:]), **DEFAULT_BETAS}, indent=2))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return str(out)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--exclude-classes", nargs="*", default=())
    parser.add_argument("--max-images", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    folder = ensure_ddpm(args.out, args.dataset, args.image_size, args.steps, args.batch_size, args.lr,
                         args.exclude_classes, args.max_images, args.seed)
    print(folder)
    return folder


if __name__ == "__main__":
    main()
