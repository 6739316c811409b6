"""What every encoder shares: the input check, the resize to a square, and running an encoder over record batches."""

from __future__ import annotations

import torch
from torch import nn

from anomgen.pixels import resize


def check_images(images: torch.Tensor, name: str) -> None:
    """``images`` must be B × 3 × H × W (in [0, 1]); the error names the encoder."""
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name}: images must be B × 3 × H × W in [0, 1], got shape {tuple(images.shape)}")


def square(images: torch.Tensor, size: int | None) -> torch.Tensor:
    """``images`` resized to ``size × size`` (:func:`anomgen.pixels.resize`), or as given when ``size`` is None."""
    return images if size is None else resize(images, (size, size))


@torch.no_grad()
def extract_features(extractor: nn.Module, batches, desc: str = "features") -> torch.Tensor:
    """Features (N × D, float32, CPU) of every image in ``batches`` (an iterable of record batches)."""
    from anomgen.progress import progress

    extractor.eval()
    feats = [extractor(batch["image"]).float().cpu() for batch in progress(batches, desc=desc)]
    if not feats:
        raise ValueError(f"{desc}: no images to extract features from")
    return torch.cat(feats)
