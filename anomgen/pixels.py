"""The one place where images change range.

Every dataset yields float images in [0, 1], CHW, RGB. A model that wants another range gets it through one of the
named helpers below, never through inline arithmetic.
"""

from __future__ import annotations

import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# open_clip.constants.OPENAI_DATASET_MEAN / STD
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_diffusion_range(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1], the range diffusion models are trained in."""
    return images * 2.0 - 1.0


def from_diffusion_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped (samplers overshoot)."""
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """[0, 1] RGB -> (x − mean) / std per channel, for encoders whose config names their own statistics
    (e.g. SigLIP's 0.5 / 0.5); the named conventions below use it."""
    return _normalize(images, mean, std)


def _normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    shape = (1, -1, 1, 1) if images.dim() == 4 else (-1, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(shape)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(shape)
    return (images - mean_t) / std_t


def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB -> ImageNet-normalised input of torchvision / timm encoders."""
    return _normalize(images, IMAGENET_MEAN, IMAGENET_STD)


def clip_normalize(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB -> CLIP-normalised input of open_clip / transformers CLIP image towers."""
    return _normalize(images, CLIP_MEAN, CLIP_STD)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float -> uint8 in [0, 255], rounded (what a PNG stores)."""
    return (images.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
