"""The record every dataset yields, real or synthetic.

A record is a plain ``dict`` (so that torch's default collate batches it) with exactly these keys:

- ``image``: float tensor 3×H×W in [0, 1], RGB.
- ``label``: int, 0 normal, 1 anomalous, -1 unknown (e.g. a multi-class set before a task says which class is normal).
- ``mask``: float tensor H×W with values in {0, 1}; zeros for normal images and for images without a ground truth.
- ``image_path``: str, the file the image came from, or a stable id such as ``sklearn-digits:00042``.
- ``mask_path``: str, the mask file, or ``""`` when there is none.
- ``category``: str, the object / class name.
- ``source``: str, ``"real"`` or the name of the generator that made the image.
- ``defect_type``: str, ``"good"`` for normals, the defect / out-class name otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NORMAL = 0
ANOMALOUS = 1
UNKNOWN = -1
GOOD = "good"
REAL = "real"

RECORD_KEYS = ("image", "label", "mask", "image_path", "mask_path", "category", "source", "defect_type")


@dataclass(frozen=True)
class Entry:
    """What a parser knows about one sample before loading it (no pixels): enough for task protocols to filter."""

    image_path: str
    label: int
    category: str
    defect_type: str
    mask_path: str | None = None
    source: str = REAL


def make_record(
    image: torch.Tensor,
    label: int,
    mask: torch.Tensor | None,
    image_path: str,
    mask_path: str | None,
    category: str,
    source: str,
    defect_type: str,
) -> dict:
    """Build a record, checking the conventions (shape, range, mask size and values)."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"{image_path}: image must be 3×H×W RGB, got shape {tuple(image.shape)}")
    if label not in (NORMAL, ANOMALOUS, UNKNOWN):
        raise ValueError(f"{image_path}: label must be 0, 1 or -1, got {label!r}")
    height, width = image.shape[-2:]
    if mask is None:
        mask = torch.zeros(height, width, dtype=torch.float32)
    if tuple(mask.shape) != (height, width):
        raise ValueError(
            f"{mask_path or image_path}: mask has size {tuple(mask.shape)}, image {image_path} has {(height, width)}"
        )
    return {
        "image": image.float(),
        "label": int(label),
        "mask": (mask > 0).float(),
        "image_path": str(image_path),
        "mask_path": str(mask_path or ""),
        "category": str(category),
        "source": str(source),
        "defect_type": str(defect_type),
    }
