"""Synthetic validation sets for model and prompt selection, one per task, all sharing the task's held-out normals.

A builder is called as ``builder(plan, out_dir, info) -> set folder`` with the task's
:class:`~anomgen.generators.diffstyle.DiffStylePlan` (its style / content / held-out parts of the support set). Each
writes the held-out normals (label 0) and its anomalies (label 1) as a synthetic set, so the sets of a task differ
only in their anomalies:

- :class:`DiffStyleSets`: the S × C DiffStyle anomalies (the method);
- :class:`NoiseSets`: Gaussian-noise images (a baseline);
- :class:`DatasetSets`: images of another dataset (a baseline; e.g. digits for Animal-MNIST tasks, Tiny-ImageNet in
  the paper).

The same number of anomalies (S·C by default) goes into every set. An existing folder is reused when it is a
complete set made for the same task, so a rerun does not generate again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from anomgen.data.generation import GeneratedBatch
from anomgen.data.record import GOOD, NORMAL
from anomgen.data.synthetic import is_complete_set, read_set_info, write_set
from anomgen.generators.diffstyle import N_CONTENT, N_STYLE, DiffStyle, DiffStylePlan
from anomgen.pixels import resize
from anomgen.seeding import sample_generator


def _held_out_samples(plan, size, start: int) -> Iterator[dict]:
    """The held-out normals as samples ``start``, ``start + 1``, ... (after the anomalies)."""
    records = [plan.held_out[j] for j in range(len(plan.held_out))]
    n = len(records)
    images = torch.cat([resize(r["image"].unsqueeze(0), size) for r in records])
    yield from GeneratedBatch(
        index=torch.arange(start, start + n), image=images, mask=None, label=torch.full((n,), NORMAL),
        generator="real", category=[r["category"] for r in records],
        defect_type=[GOOD] * n, sources=[[r["image_path"]] for r in records], params=[{"role": "held_out"}] * n,
    ).rows()


def _image_size(plan) -> tuple[int, int]:
    return tuple(plan.held_out[0]["image"].shape[-2:])


def _write(out_dir: Path, samples: Callable[[], Iterator[dict]], info: dict) -> Path:
    """Write the set, or reuse a complete one made with the same ``info``."""
    out_dir = Path(out_dir)
    if is_complete_set(out_dir):
        made_for = read_set_info(out_dir).get("selection")
        if made_for == json.loads(json.dumps(info)):
            return out_dir
        raise FileExistsError(f"{out_dir} holds a synthetic set made for {made_for}, not {info}; remove it or choose "
                              "another output folder")
    return write_set(out_dir, samples(), {"generator": info["generator"], "selection": info})


class DiffStyleSets:
    """DiffStyle anomalies of every (style, content) pair of the plan; the UNet is loaded once for all tasks."""

    name = "diffstyle"

    def __init__(self, unet: nn.Module, seed: int = 0, batch_size: int = 32, **diffstyle) -> None:
        """``diffstyle``: :class:`~anomgen.generators.diffstyle.DiffStyleConfig` fields (t_edit, gamma, ...)."""
        self.generator = DiffStyle(unet, **diffstyle)
        size = getattr(getattr(unet, "config", None), "sample_size", None)
        self.unet_size = None if size is None else ((size, size) if isinstance(size, int) else tuple(size))
        self.seed, self.batch_size = seed, batch_size

    def __call__(self, plan, out_dir: str | Path, info: dict) -> Path:
        size = _image_size(plan)
        work_size = self.unet_size or size

        def stack(part) -> torch.Tensor:
            return resize(torch.stack([part[i]["image"] for i in range(len(part))]), work_size)

        def samples() -> Iterator[dict]:
            for indices, images in self.generator.cross_product(stack(plan.style), stack(plan.content), self.seed,
                                                                self.batch_size):
                fields = [plan.anomaly_fields(i) for i in indices]
                yield from GeneratedBatch(
                    index=torch.tensor(indices), image=resize(images, size), mask=None,
                    label=torch.ones(len(indices), dtype=torch.long), generator=self.name,
                    category=[f["category"] for f in fields], defect_type=[self.name] * len(indices),
                    sources=[f["sources"] for f in fields],
                    params=[{**self.generator.params, "seed": self.seed, "role": "anomaly"}] * len(indices),
                ).rows()
            yield from _held_out_samples(plan, size, plan.n_pairs)

        return _write(Path(out_dir), samples, {**info, "generator": self.name, **self.generator.params,
                                               "seed": self.seed})


class NoiseSets:
    """Gaussian-noise anomalies N(mean, std²) clamped to [0, 1], grey or colour, seeded by sample index."""

    name = "noise"

    def __init__(self, num_anomalies: int | None = None, mean: float = 0.5, std: float = 0.25, grey: bool = True,
                 seed: int = 0) -> None:
        self.num_anomalies, self.mean, self.std, self.grey, self.seed = num_anomalies, mean, std, grey, seed

    def __call__(self, plan, out_dir: str | Path, info: dict) -> Path:
        size = _image_size(plan)
        n = self.num_anomalies or plan.n_pairs
        category = plan.held_out[0]["category"]

        def samples() -> Iterator[dict]:
            for i in range(n):
                shape = (1 if self.grey else 3, *size)
                noise = torch.randn(shape, generator=sample_generator(self.seed, i)) * self.std + self.mean
                yield from GeneratedBatch(
                    index=torch.tensor([i]), image=noise.clamp(0, 1).expand(3, *size)[None], mask=None,
                    label=torch.ones(1, dtype=torch.long), generator=self.name, category=[category],
                    defect_type=[self.name], sources=[[]],
                    params=[{"mean": self.mean, "std": self.std, "seed": self.seed}],
                ).rows()
            yield from _held_out_samples(plan, size, n)

        return _write(Path(out_dir), samples, {**info, "generator": self.name, "n": n, "mean": self.mean,
                                               "std": self.std, "seed": self.seed})


class DatasetSets:
    """Images of another dataset as anomalies (``dataset``: a parsed dataset, e.g. ``Digits(split="train")``),
    drawn without replacement by ``seed`` and resized to the task's image size."""

    name = "other_dataset"

    def __init__(self, dataset, num_anomalies: int | None = None, seed: int = 0, name: str | None = None) -> None:
        self.dataset, self.num_anomalies, self.seed = dataset, num_anomalies, seed
        self.name = name or self.name

    def __call__(self, plan, out_dir: str | Path, info: dict) -> Path:
        size = _image_size(plan)
        n = self.num_anomalies or plan.n_pairs
        if n > len(self.dataset):
            raise ValueError(f"{self.name}: asked for {n} anomalies, the dataset has {len(self.dataset)} images")
        chosen = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed))[:n].tolist()
        category = plan.held_out[0]["category"]

        def samples() -> Iterator[dict]:
            for position, i in enumerate(chosen):
                record = self.dataset[i]
                yield from GeneratedBatch(
                    index=torch.tensor([position]), image=resize(record["image"].unsqueeze(0), size), mask=None,
                    label=torch.ones(1, dtype=torch.long), generator=self.name, category=[category],
                    defect_type=[self.name], sources=[[record["image_path"]]], params=[{"seed": self.seed}],
                ).rows()
            yield from _held_out_samples(plan, size, n)

        return _write(Path(out_dir), samples, {**info, "generator": self.name, "n": n, "seed": self.seed,
                                               "dataset": type(self.dataset).__name__})


def selection_task(name: str, support, test_set, builders: dict, sets_dir: str | Path, n_style: int = N_STYLE,
                   n_content: int = N_CONTENT, n_held_out: int | None = None, seed: int = 0,
                   bank_without_sources: bool = False, info: dict | None = None):
    """One task of model / prompt selection: the support split by a :class:`DiffStylePlan`, every builder's
    validation set written under ``sets_dir/<builder name>``, and the banks: all of the support for real scoring,
    the support minus the held-out normals for synthetic scoring, and, with ``bank_without_sources``, minus the style
    and content images too (then no synthetic anomaly is scored against the very images it was made from; it needs
    a support larger than the split)."""
    from anomgen.data.synthetic import SyntheticSet
    from anomgen.data.tasks import TaskView
    from anomgen.selection.model_selection import SelectionTask

    plan = DiffStylePlan(support, n_style, n_content, n_held_out, seed=seed)
    held = {e.image_path for e in plan.held_out.entries}
    if bank_without_sources:
        held |= {e.image_path for e in plan.style.entries} | {e.image_path for e in plan.content.entries}
        if len(held) >= len(support):
            raise ValueError(f"selection task {name!r}: bank_without_sources leaves no image in the synthetic bank "
                             f"(support {len(support)}, split {len(held)}); lower n_held_out or set it false")
    synthetic_bank = TaskView(support, [i for i, e in enumerate(support.entries) if e.image_path not in held],
                              name=f"{name}-bank-without-held-out")
    info = {"task": name, "n_style": n_style, "n_content": n_content, "n_held_out": len(plan.held_out),
            "split_seed": seed, "bank_without_sources": bank_without_sources, **(info or {})}
    size = _image_size(plan)
    sets = {set_name: SyntheticSet(builder(plan, Path(sets_dir) / set_name, info), image_size=size)
            for set_name, builder in builders.items()}
    return SelectionTask(name, support, synthetic_bank, test_set, sets)
