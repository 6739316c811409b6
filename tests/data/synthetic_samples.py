"""Samples for the synthetic-set tests (imported by tests/data/test_synthetic_*.py and tests/data/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from anomgen.data.synthetic import SetWriter, format_id

H, W = 12, 16
INFO = {"generator": "noise_patch", "config": {"size": 4}, "checkpoint": None, "task": {"normal": "3"}}


def image_of(seed: int) -> torch.Tensor:
    return torch.rand(3, H, W, generator=torch.Generator().manual_seed(seed))


def mask_of(seed: int) -> torch.Tensor:
    mask = torch.zeros(H, W)
    top, left = seed % (H - 4), seed % (W - 4)
    mask[top : top + 4, left : left + 4] = 1.0
    return mask


def make_sample(index: int, label: int = 1, mask: bool = True, category: str = "3", **extra) -> dict:
    sample = {
        "id": format_id(index),
        "image": image_of(index),
        "mask": mask_of(index) if (mask and label == 1) else None,
        "label": label,
        "generator": "noise_patch",
        "category": category,
        "sources": [f"sklearn-digits:{index:05d}"],
        "params": {"seed": index, "size": torch.tensor(4), "alpha": np.float32(0.5)},
    }
    sample.update(extra)
    return sample


def write_shard(directory: Path, indices, **kwargs) -> Path:
    writer = SetWriter(directory)
    for i in indices:
        writer.add(**make_sample(i, **kwargs))
    writer.close()
    return directory


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))
