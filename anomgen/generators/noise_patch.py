"""The simplest anomaly maker: replace a random rectangle of a normal image by uniform noise.

It exists so that the whole pipeline (generate -> export -> evaluate) runs before any learned generator does; it is
not one of the paper methods. Every draw comes from the generator passed in, which the caller seeds by the sample's
global index.
"""

from __future__ import annotations

import torch

NAME = "noise_patch"


class NoisePatchGenerator:
    """Paste a rectangle of uniform noise, with side lengths a random fraction of the image's."""

    name = NAME

    def __init__(self, min_fraction: float = 0.2, max_fraction: float = 0.5) -> None:
        if not 0.0 < min_fraction <= max_fraction <= 1.0:
            raise ValueError(f"need 0 < min_fraction <= max_fraction <= 1, got {min_fraction}, {max_fraction}")
        self.min_fraction, self.max_fraction = min_fraction, max_fraction

    def __call__(self, image: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """``image`` 3×H×W in [0, 1] -> (anomalous image, H×W mask, parameters of the draw)."""
        _, height, width = image.shape

        def uniform(lo: float, hi: float) -> float:
            return lo + (hi - lo) * float(torch.rand((), generator=generator))

        h = max(1, round(height * uniform(self.min_fraction, self.max_fraction)))
        w = max(1, round(width * uniform(self.min_fraction, self.max_fraction)))
        top = int(torch.randint(0, height - h + 1, (), generator=generator))
        left = int(torch.randint(0, width - w + 1, (), generator=generator))
        noise = torch.rand((image.shape[0], h, w), generator=generator)
        out = image.clone()
        out[:, top : top + h, left : left + w] = noise
        mask = torch.zeros(height, width)
        mask[top : top + h, left : left + w] = 1.0
        return out, mask, {"box": [top, left, h, w]}
