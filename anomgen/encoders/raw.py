"""Pixels as features: the image itself (:class:`RawPixels`, :func:`raw_pixels`) or averaged down
(:class:`DownsampledPixels`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anomgen.encoders.base import check_images


class RawPixels(nn.Module):
    """The image itself as a feature vector (optionally resized and reduced to one grey channel).

    A fine feature space for tiny images (8×8 digits, 28×28 silhouettes), and the FID feature space there.
    """

    def __init__(self, image_size: int | None = None, grayscale: bool = True) -> None:
        super().__init__()
        self.image_size = image_size
        self.grayscale = grayscale

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.image_size is not None and tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   antialias=True, align_corners=False)
        if self.grayscale:
            images = images.mean(dim=1, keepdim=True)
        return images.flatten(1)


class DownsampledPixels(nn.Module):
    """The image averaged down to ``size × size`` (area resize: each output pixel is the mean of its input
    region), colour (or grey, the mean over RGB) kept, flattened."""

    def __init__(self, size: int = 8, grayscale: bool = False, name: str | None = None) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"DownsampledPixels: size must be >= 1, got {size}")
        self.size, self.grayscale = int(size), bool(grayscale)
        self.name = name or f"pixels-{self.size}{'-grey' if self.grayscale else ''}"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.name)
        out = F.interpolate(images.float(), size=(self.size, self.size), mode="area")
        if self.grayscale:
            out = out.mean(dim=1, keepdim=True)
        return out.flatten(1)


def raw_pixels(image_size: int | None = None, grayscale: bool = True, name: str | None = None) -> RawPixels:
    """:class:`RawPixels` with a ``name`` (``pixels-raw``, ``pixels-raw-32-rgb``, ...)."""
    module = RawPixels(image_size=image_size, grayscale=grayscale)
    size = "" if image_size is None else f"-{image_size}"
    module.name = name or f"pixels-raw{size}{'' if grayscale else '-rgb'}"
    return module
