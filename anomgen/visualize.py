"""Image grids with mask overlays, for loggers and reports."""

from __future__ import annotations

import math

import torch


def overlay_mask(images: torch.Tensor, masks: torch.Tensor | None, color=(1.0, 0.0, 0.0), alpha: float = 0.4):
    """Tint the masked pixels of [0, 1] images (B × 3 × H × W) with ``color``; draw nothing where masks are 0."""
    if masks is None:
        return images
    m = (masks > 0).float().unsqueeze(1).to(images)
    tint = torch.tensor(color, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return images * (1 - alpha * m) + tint * (alpha * m)


#: the smallest side of a tile in a grid, in pixels: smaller images are enlarged (8×8 digits would make a grid ~40 px
#: wide, unreadable in W&B and in the PNGs)
MIN_TILE = 64


def upscale_nearest(images: torch.Tensor, min_side: int = MIN_TILE) -> torch.Tensor:
    """B × C × H × W images enlarged by the smallest whole factor that makes both sides at least ``min_side``, each
    pixel repeated as a block (nearest neighbour: no blur, no new values); as given when already large enough."""
    factor = max(1, math.ceil(min_side / max(1, min(images.shape[-2:]))))
    if factor == 1:
        return images
    return images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)


def image_grid(images: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: float = 1.0,
               min_tile: int = MIN_TILE):
    """Tile B × 3 × H × W images into one 3 × H' × W' image (row-major); images smaller than ``min_tile`` pixels a
    side are enlarged first by :func:`upscale_nearest` (``min_tile=1``: as they are)."""
    images = upscale_nearest(images.detach().cpu(), min_tile)
    b, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(b)))
    ncol = math.ceil(b / nrow)
    grid = torch.full((c, ncol * (h + padding) + padding, nrow * (w + padding) + padding), pad_value,
                      dtype=images.dtype)
    for i in range(b):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = images[i]
    return grid


def save_png(image: torch.Tensor, path) -> None:
    """Save a 3 × H × W [0, 1] image as an 8-bit PNG."""
    from PIL import Image

    from anomgen.pixels import to_uint8

    Image.fromarray(to_uint8(image).permute(1, 2, 0).cpu().numpy()).save(path)


def score_histogram(scores, kept, title: str = "", bins: int = 30) -> torch.Tensor:
    """A 3 × H × W [0, 1] image of a histogram of ``scores``, the ``kept`` ones (bools, same order) stacked in another
    colour, for loggers (quality scores of a synthetic set and the part that was kept)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = np.asarray(list(scores), dtype=float)
    kept = np.asarray(list(kept), dtype=bool)
    fig = Figure(figsize=(5, 3.5), dpi=100)
    canvas = FigureCanvasAgg(fig)
    ax = fig.subplots()
    edges = np.histogram_bin_edges(values, bins=bins) if len(values) else bins
    ax.hist([values[~kept], values[kept]], bins=edges, stacked=True, color=["#b0b0b0", "#d62728"],
            label=[f"dropped ({int((~kept).sum())})", f"kept ({int(kept.sum())})"])
    ax.set_xlabel("score")
    ax.set_ylabel("anomalies")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).float() / 255.0
