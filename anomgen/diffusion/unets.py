"""Diffusion UNets (ε-prediction, DDPM / DDIM schedule) by id, path or config: the frozen models that DiffStyle and
Asyrp edit in h-space.

:func:`load_diffusion_unet` accepts

- a diffusers model: a hub id (``google/ddpm-ema-church-256``) or a folder saved with ``save_pretrained`` (a
  ``unet/`` subfolder of a pipeline is found too), resolved by :func:`anomgen.pretrained.resolve`;
- a guided-diffusion checkpoint (``256x256_diffusion_uncond.pt`` or any ``.pt`` / ``.pth`` file with ADM keys),
  converted by :mod:`anomgen.diffusion.adm`; ``config`` then overrides the ADM architecture flags;
- ``None`` with ``config``: a randomly initialised ``UNet2DModel(**config)`` (debug runs and tests).

Weights always load strictly. The model comes back frozen, in eval mode.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import nn

ADM_SUFFIXES = (".pt", ".pth")
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def load_diffusion_unet(source: str | None = None, config: Mapping | None = None) -> nn.Module:
    from diffusers import UNet2DModel

    config = dict(config or {})
    if source is None:
        if not config:
            raise ValueError("load_diffusion_unet: give a `source` (hub id, folder or ADM .pt file) or a `config`")
        unet = UNet2DModel(**config)
    elif str(source).endswith(ADM_SUFFIXES):
        from anomgen.diffusion.adm import load_adm_unet

        unet = load_adm_unet(str(source), **config)
    else:
        unet = _load_diffusers_unet(str(source), config)
    unet.eval().requires_grad_(False)
    return unet


def _load_diffusers_unet(source: str, overrides: Mapping) -> nn.Module:
    from diffusers import UNet2DModel

    from anomgen.pretrained import load_state_dict_strict, load_weights_file, resolve

    folder = resolve(source)
    if (folder / "unet").is_dir():
        folder = folder / "unet"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"diffusion UNet {source!r}: no config.json in {folder} (expected a folder written by "
                                "UNet2DModel.save_pretrained, or a pipeline folder with a unet/ subfolder)")
    weights = next((folder / n for n in DIFFUSERS_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"diffusion UNet {source!r}: none of {DIFFUSERS_WEIGHTS} in {folder}")
    unet = UNet2DModel.from_config({**UNet2DModel.load_config(folder), **overrides})
    load_state_dict_strict(unet, load_weights_file(weights), source=str(weights))
    return unet


def save_diffusion_unet(unet: nn.Module, folder: str | Path) -> Path:
    """Save a ``UNet2DModel`` as a diffusers folder (safetensors), readable by :func:`load_diffusion_unet`."""
    folder = Path(folder)
    unet.save_pretrained(folder, safe_serialization=True)
    return folder
