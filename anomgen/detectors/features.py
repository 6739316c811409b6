"""Feature extractors: modules that map a batch of [0, 1] images (B × 3 × H × W) to features (B × D)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


@torch.no_grad()
def extract_features(extractor: nn.Module, batches, desc: str = "features") -> torch.Tensor:
    """Features (N × D, float32, CPU) of every image in ``batches`` (an iterable of record batches)."""
    from tqdm.auto import tqdm

    extractor.eval()
    feats = [extractor(batch["image"]).float().cpu() for batch in tqdm(batches, desc=desc, leave=False)]
    if not feats:
        raise ValueError(f"{desc}: no images to extract features from")
    return torch.cat(feats)
