"""Features with no trained weights: :class:`HOGFeatures` (histograms of oriented gradients, scikit-image) and
:class:`RandomConvFeatures` (a randomly initialised CNN fixed by its seed)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from anomgen.encoders.base import check_images, square
from anomgen.pixels import imagenet_normalize


class HOGFeatures(nn.Module):
    """HOG descriptor (:func:`skimage.feature.hog`, L2-Hys blocks) of the grey image (mean over RGB), after a
    resize to ``image_size`` (``None``: as given). Computed on the CPU, one image at a time."""

    def __init__(self, image_size: int | None = 64, orientations: int = 9, pixels_per_cell: int = 8,
                 cells_per_block: int = 2, name: str | None = None) -> None:
        super().__init__()
        self.image_size = None if image_size is None else int(image_size)
        self.orientations, self.pixels_per_cell = int(orientations), int(pixels_per_cell)
        self.cells_per_block = int(cells_per_block)
        if self.image_size is not None:
            self._check_size(self.image_size, self.image_size)
        self.name = name or (f"hog-{self.image_size or 'native'}-o{self.orientations}-p{self.pixels_per_cell}"
                             f"-b{self.cells_per_block}")

    def _check_size(self, height: int, width: int) -> None:
        cells = min(height, width) // self.pixels_per_cell
        if cells < self.cells_per_block:
            raise ValueError(f"{type(self).__name__}: {height}×{width} images hold {cells} cells of "
                             f"{self.pixels_per_cell} px per side, fewer than cells_per_block = {self.cells_per_block}"
                             "; raise image_size or lower pixels_per_cell")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from skimage.feature import hog

        check_images(images, self.name)
        grey = square(images, self.image_size).mean(dim=1).detach().cpu().double().numpy()
        self._check_size(*grey.shape[-2:])
        feats = [hog(g, orientations=self.orientations, pixels_per_cell=(self.pixels_per_cell,) * 2,
                     cells_per_block=(self.cells_per_block,) * 2, block_norm="L2-Hys", feature_vector=True)
                 for g in grey]
        return torch.from_numpy(np.stack(feats)).float().to(images.device)


class RandomConvFeatures(nn.Module):
    """A randomly initialised CNN, the same for the same ``seed`` (the global random state is not touched).

    ``depth`` blocks of 3×3 convolution + ReLU with ``channels`` channels, every block after the first with stride
    2; the output is average-pooled over space (B × ``channels``). Input: ImageNet-normalised, resized to
    ``image_size`` when given. Weights: Kaiming-normal (fan-in, ReLU gain), biases zero.
    """

    def __init__(self, channels: int = 64, depth: int = 3, seed: int = 0, image_size: int | None = None,
                 name: str | None = None) -> None:
        super().__init__()
        if channels < 1 or depth < 1:
            raise ValueError(f"RandomConvFeatures: channels and depth must be >= 1, got {channels}, {depth}")
        self.channels, self.depth, self.seed = int(channels), int(depth), int(seed)
        self.image_size = None if image_size is None else int(image_size)
        layers: list[nn.Module] = []
        for i in range(self.depth):
            layers += [nn.Conv2d(3 if i == 0 else self.channels, self.channels, 3, stride=1 if i == 0 else 2,
                                 padding=1, device="meta"), nn.ReLU()]
        self.body = nn.Sequential(*layers).to_empty(device="cpu")
        generator = torch.Generator().manual_seed(self.seed)
        for layer in self.body:
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu", generator=generator)
                nn.init.zeros_(layer.bias)
        for p in self.parameters():
            p.requires_grad_(False)
        self.name = name or f"randconv-c{self.channels}-d{self.depth}-s{self.seed}"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.name)
        return self.body(imagenet_normalize(square(images, self.image_size))).mean(dim=(2, 3)).float()
