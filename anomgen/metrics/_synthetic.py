"""Synthetic anomaly maps and masks for the metric tests and the pixel-metrics memory benchmark.

Maps are smooth random fields plus a bump over each ground-truth blob, squashed into (0, 1) by a logistic
function (a property of this synthetic data, not of any metric: metrics never transform scores). Masks are unions
of random ellipses; every ``normal_every``-th image has an empty mask. Image ``i`` depends only on ``(seed, i)``, so
a benchmark can generate the data batch by batch and different runs see identical data.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

__all__ = ["smooth_maps_and_blob_masks"]


def _one_image(seed: int, index: int, height: int, width: int, normal_every: int, max_blobs: int):
    rng = np.random.default_rng([seed, index])
    low_h, low_w = max(height // 16, 4), max(width // 16, 4)
    noise = ndimage.gaussian_filter(rng.standard_normal((low_h, low_w)), 1.0, mode="wrap")
    noise = (noise - noise.mean()) / (noise.std() + 1e-12)
    field = torch.nn.functional.interpolate(
        torch.from_numpy(noise)[None, None], size=(height, width), mode="bicubic", align_corners=False
    )[0, 0].numpy()
    mask = np.zeros((height, width), dtype=bool)
    bump = np.zeros((height, width), dtype=np.float64)
    if normal_every <= 0 or index % normal_every != 0:
        yy = np.arange(height, dtype=np.float64)[:, None]
        xx = np.arange(width, dtype=np.float64)[None, :]
        for _ in range(int(rng.integers(1, max_blobs + 1))):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            ry = rng.uniform(0.03, 0.12) * height
            rx = rng.uniform(0.03, 0.12) * width
            d2 = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2
            mask |= d2 <= 1.0
            np.maximum(bump, np.exp(-0.5 * d2), out=bump)
    z = field + 3.0 * bump - 1.0
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32), mask


def smooth_maps_and_blob_masks(
    n: int,
    height: int = 64,
    width: int | None = None,
    *,
    seed: int = 0,
    start: int = 0,
    normal_every: int = 4,
    max_blobs: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``start .. start+n-1``: float32 maps (n, H, W) in (0, 1) and bool masks (n, H, W)."""
    width = height if width is None else width
    maps = np.empty((n, height, width), dtype=np.float32)
    masks = np.empty((n, height, width), dtype=bool)
    for j in range(n):
        maps[j], masks[j] = _one_image(seed, start + j, height, width, normal_every, max_blobs)
    return torch.from_numpy(maps), torch.from_numpy(masks)
