"""What a generator is asked to make and what it hands back.

- :class:`GenerationRequests`: one request per synthetic sample, identified by its global index.
- :class:`GeneratedBatch`: the typed batch every generator returns (``predict_step`` of the generator wrappers, the
  FID callback's exports, the validation-set builders) and the synthetic-set export writes
  (:meth:`anomgen.data.synthetic.SetWriter.add_batch`). It checks itself on construction, so a malformed batch fails
  where it is made, with an error naming the field, not later in the writer.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from anomgen.data.record import ANOMALOUS, NORMAL

_IMAGE_TOLERANCE = 1e-3


class GenerationRequests(Dataset):
    """Request ``i`` = global index ``i`` + the support image it starts from (``sources[i % len(sources)]``).

    The sample's randomness is seeded by the index (see :mod:`anomgen.seeding`), so a request gives the same sample
    whichever device or batch handles it.
    """

    def __init__(self, sources: Dataset, num_samples: int | None = None) -> None:
        if len(sources) == 0:
            raise ValueError("generation needs at least one source image, the support set is empty")
        self.sources = sources
        self.num_samples = len(sources) if num_samples is None else int(num_samples)
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict:
        return {"index": index, "source": self.sources[index % len(self.sources)]}


def _long_vector(value: Any, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    if tensor.dtype == torch.bool or tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(f"GeneratedBatch.{name} must hold integers, got dtype {tensor.dtype}")
    if tensor.dim() != 1:
        raise ValueError(f"GeneratedBatch.{name} must be a vector of length B, got shape {tuple(tensor.shape)}")
    return tensor.long()


def _string_list(value: Any, name: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise TypeError(f"GeneratedBatch.{name} must be a list of str (one per sample), got {type(value).__name__}")
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise TypeError(f"GeneratedBatch.{name} must hold str, got {bad[0]!r} ({type(bad[0]).__name__})")
    return list(value)


@dataclass
class GeneratedBatch:
    """B generated samples, one row each in the synthetic set.

    - ``index``: LongTensor (B,), the samples' global indices (their ids in the set, :func:`format_id`);
    - ``image``: B × 3 × H × W, float in [0, 1];
    - ``mask``: B × H × W in {0, 1} (bool or numbers), or ``None`` when the generator makes no masks;
    - ``label``: LongTensor (B,), 1 anomalous, 0 normal (normals a generator passes through, e.g. held-out ones);
    - ``generator``: str, the generator's name;
    - ``category``, ``defect_type``: lists of B str; ``sources``: B lists of source ids (image paths) it was made from;
    - ``params``: B dicts of JSON-serialisable parameters of each draw.

    Lists may be given as tuples, ``index`` / ``label`` as lists of ints; they are stored as lists and LongTensors.
    Construction checks lengths, shapes, dtypes and value ranges and raises :class:`ValueError` / :class:`TypeError`
    naming the field.
    """

    index: torch.Tensor
    image: torch.Tensor
    mask: torch.Tensor | None
    label: torch.Tensor
    generator: str
    category: list[str]
    defect_type: list[str]
    sources: list[list[str]]
    params: list[dict]

    def __post_init__(self) -> None:
        self.index = _long_vector(self.index, "index")
        n = len(self.index)
        if n == 0:
            raise ValueError("GeneratedBatch.index is empty: a batch holds at least one sample")
        if (self.index < 0).any():
            raise ValueError(f"GeneratedBatch.index must be >= 0, got {self.index.tolist()}")

        if not isinstance(self.image, torch.Tensor):
            raise TypeError(f"GeneratedBatch.image must be a tensor, got {type(self.image).__name__}")
        if self.image.dim() != 4 or self.image.shape[1] != 3:
            raise ValueError(f"GeneratedBatch.image must be B × 3 × H × W, got shape {tuple(self.image.shape)}")
        if not self.image.is_floating_point():
            raise TypeError(f"GeneratedBatch.image must be a float tensor in [0, 1], got dtype {self.image.dtype}")
        low, high = torch.aminmax(self.image.detach())
        low, high = float(low), float(high)
        if not (low >= -_IMAGE_TOLERANCE and high <= 1 + _IMAGE_TOLERANCE):  # NaN fails too
            raise ValueError(f"GeneratedBatch.image values must lie in [0, 1], got [{low:.4f}, {high:.4f}] "
                             "(convert diffusion outputs with anomgen.pixels.from_diffusion_range)")
        size = tuple(self.image.shape[-2:])

        if self.mask is not None:
            if not isinstance(self.mask, torch.Tensor):
                raise TypeError(f"GeneratedBatch.mask must be a tensor or None, got {type(self.mask).__name__}")
            if self.mask.dim() == 4 and self.mask.shape[1] == 1:
                self.mask = self.mask[:, 0]
            if self.mask.dim() != 3 or tuple(self.mask.shape[-2:]) != size:
                raise ValueError(f"GeneratedBatch.mask must be B × H × W = ({n}, {size[0]}, {size[1]}) like the "
                                 f"images, got shape {tuple(self.mask.shape)}")
            if not ((self.mask == 0) | (self.mask == 1)).all():
                raise ValueError("GeneratedBatch.mask must hold only 0 and 1")

        self.label = _long_vector(self.label, "label")
        if not ((self.label == NORMAL) | (self.label == ANOMALOUS)).all():
            raise ValueError(f"GeneratedBatch.label must be 0 (normal) or 1 (anomalous), got {self.label.tolist()}")
        if not isinstance(self.generator, str) or not self.generator:
            raise TypeError(f"GeneratedBatch.generator must be a non-empty str, got {self.generator!r}")
        self.category = _string_list(self.category, "category")
        self.defect_type = _string_list(self.defect_type, "defect_type")
        if isinstance(self.sources, str) or not isinstance(self.sources, Sequence):
            raise TypeError(f"GeneratedBatch.sources must be a list of lists of str, got {type(self.sources).__name__}")
        self.sources = [_string_list(s, "sources[i]") for s in self.sources]
        if isinstance(self.params, Mapping) or not isinstance(self.params, Sequence) \
                or not all(isinstance(p, Mapping) for p in self.params):
            raise TypeError("GeneratedBatch.params must be a list of dicts, one per sample")
        self.params = [dict(p) for p in self.params]

        lengths = {"index": n, "image": len(self.image), "mask": n if self.mask is None else len(self.mask),
                   "label": len(self.label), "category": len(self.category), "defect_type": len(self.defect_type),
                   "sources": len(self.sources), "params": len(self.params)}
        wrong = {k: v for k, v in lengths.items() if v != n}
        if wrong:
            raise ValueError(f"GeneratedBatch: every field holds one entry per sample (B = {n}, from index); "
                             + ", ".join(f"{k} has {v}" for k, v in wrong.items()))

    def __len__(self) -> int:
        return len(self.index)

    def rows(self) -> Iterator[dict]:
        """One dict per sample, the keyword arguments of :meth:`anomgen.data.synthetic.SetWriter.add`
        (``id`` = :func:`~anomgen.data.synthetic.format_id` of the index; image and mask on the CPU)."""
        from anomgen.data.synthetic.format import format_id

        images = self.image.detach().float().cpu()
        masks = None if self.mask is None else self.mask.detach().cpu()
        for j, index in enumerate(self.index.tolist()):
            yield {"id": format_id(index), "image": images[j], "mask": None if masks is None else masks[j],
                   "label": int(self.label[j]), "generator": self.generator, "category": self.category[j],
                   "defect_type": self.defect_type[j], "sources": list(self.sources[j]), "params": self.params[j]}

    @classmethod
    def from_samples(cls, generator: str, samples: Sequence[Mapping[str, Any]]) -> GeneratedBatch:
        """A batch from per-sample dicts (``index``, ``image`` 3 × H × W, ``label``, ``category``, ``defect_type``,
        ``sources``, ``params``, optional ``mask`` H × W): for batches that mix rows of different kinds, e.g. a
        generator's anomalies and the held-out normals it passes through.

        When some samples have a mask, a normal sample without one gets an all-zero mask; an anomalous one without a
        mask is an error (a zero mask would claim it has no defect pixels)."""
        if not samples:
            raise ValueError("GeneratedBatch.from_samples: no samples")
        masks = [s.get("mask") for s in samples]
        mask = None
        if any(m is not None for m in masks):
            size = tuple(samples[0]["image"].shape[-2:])
            for position, (s, m) in enumerate(zip(samples, masks)):
                if m is None and int(s["label"]) == ANOMALOUS:
                    raise ValueError(f"GeneratedBatch.mask: anomalous sample {position} (index {s['index']}) has no "
                                     "mask while others have one")
            mask = torch.stack([torch.zeros(size) if m is None else torch.as_tensor(m).float().cpu() for m in masks])
        return cls(index=torch.tensor([int(s["index"]) for s in samples]),
                   image=torch.stack([s["image"] for s in samples]), mask=mask,
                   label=torch.tensor([int(s["label"]) for s in samples]), generator=generator,
                   category=[s["category"] for s in samples], defect_type=[s["defect_type"] for s in samples],
                   sources=[list(s["sources"]) for s in samples], params=[dict(s["params"]) for s in samples])
