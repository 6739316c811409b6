"""Task protocols: which samples are normal, which are anomalous, and which are used for what.

A task never copies pixels: it is a :class:`TaskView` over a parsed dataset, a list of indices with the label
(and defect type) that the protocol gives each one.

- Multi-class sets (digits, Animal-MNIST, CUB, Flowers, CIFAR): one class is normal. ``one_vs_rest`` labels every
  other class anomalous; ``one_vs_one`` keeps one out-class; ``one_vs_one_all`` gives every out-class, and the
  "closest" out-class is the one where a detector does worst (:func:`closest_out_class`, chosen from scores).
- Defect sets (MVTec AD, VisA, Folder): one category, its defect types are the out-classes (:func:`per_defect_type`).
- Support sets: ``k_shot`` (K normals drawn by seed), ``split_support`` (style / content / held-out normals),
  ``anomalydiffusion_split`` (first ⌊n/3⌋ of each defect type, by id, train; the rest test: disjoint).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from torch.utils.data import Dataset

from anomgen.data.record import ANOMALOUS, GOOD, NORMAL, Entry
from anomgen.errors import DatasetError


class TaskView(Dataset):
    """A view of ``base`` (a dataset with ``entries``) through ``indices``, with labels set by a protocol."""

    def __init__(
        self,
        base,
        indices: Sequence[int],
        labels: Sequence[int] | None = None,
        defect_types: Sequence[str] | None = None,
        name: str = "",
    ) -> None:
        self.base = base
        self.indices = [int(i) for i in indices]
        self.labels = None if labels is None else [int(v) for v in labels]
        self.defect_types = None if defect_types is None else list(defect_types)
        self.name = name

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def entries(self) -> list[Entry]:
        out = []
        base_entries = self.base.entries  # a property of nested views: read it once, not once per index
        for pos, i in enumerate(self.indices):
            e = base_entries[i]
            out.append(
                Entry(
                    e.image_path,
                    e.label if self.labels is None else self.labels[pos],
                    e.category,
                    e.defect_type if self.defect_types is None else self.defect_types[pos],
                    e.mask_path,
                    e.source,
                )
            )
        return out

    def __getitem__(self, pos: int) -> dict:
        record = self.base[self.indices[pos]]
        if self.labels is not None:
            record["label"] = self.labels[pos]
        if self.defect_types is not None:
            record["defect_type"] = self.defect_types[pos]
        return record


def _entries(dataset) -> list[Entry]:
    entries = getattr(dataset, "entries", None)
    if entries is None:
        raise TypeError(f"{type(dataset).__name__} has no `entries`; task protocols need a parsed anomgen dataset")
    return entries


def _classes(dataset) -> list[str]:
    return list(dict.fromkeys(e.category for e in _entries(dataset)))


def _check_class(dataset, name: str, role: str) -> None:
    classes = _classes(dataset)
    if name not in classes:
        raise DatasetError(f"unknown {role} class {name!r}; valid classes: {', '.join(map(str, classes))}")


def normal_class(dataset, normal: str) -> TaskView:
    """Only the images of the normal class, labelled 0 (the training set of one-class detection)."""
    _check_class(dataset, normal, "normal")
    idx = [i for i, e in enumerate(_entries(dataset)) if e.category == normal]
    return TaskView(dataset, idx, [NORMAL] * len(idx), [GOOD] * len(idx), name=f"{normal}")


def one_vs_rest(dataset, normal: str) -> TaskView:
    """Every image; the normal class labelled 0, every other class 1 with its class name as defect type."""
    _check_class(dataset, normal, "normal")
    entries = _entries(dataset)
    labels = [NORMAL if e.category == normal else ANOMALOUS for e in entries]
    defects = [GOOD if e.category == normal else e.category for e in entries]
    return TaskView(dataset, range(len(entries)), labels, defects, name=f"{normal}-vs-rest")


def one_vs_one(dataset, normal: str, out: str) -> TaskView:
    """The normal class (label 0) against one out-class (label 1)."""
    _check_class(dataset, normal, "normal")
    _check_class(dataset, out, "out")
    if out == normal:
        raise DatasetError(f"one-vs-one: the out-class must differ from the normal class {normal!r}")
    entries = _entries(dataset)
    idx = [i for i, e in enumerate(entries) if e.category in (normal, out)]
    labels = [NORMAL if entries[i].category == normal else ANOMALOUS for i in idx]
    defects = [GOOD if entries[i].category == normal else out for i in idx]
    return TaskView(dataset, idx, labels, defects, name=f"{normal}-vs-{out}")


def one_vs_one_all(dataset, normal: str) -> dict[str, TaskView]:
    """``{out_class: one_vs_one(dataset, normal, out_class)}`` for every other class."""
    return {c: one_vs_one(dataset, normal, c) for c in _classes(dataset) if c != normal}


def closest_out_class(auroc_per_out_class: Mapping[str, float]) -> tuple[str, float]:
    """The out-class on which the detector does worst (lowest AUROC): the "one-vs-one closest" figure."""
    if not auroc_per_out_class:
        raise ValueError("closest_out_class needs at least one out-class score")
    name = min(auroc_per_out_class, key=lambda k: auroc_per_out_class[k])
    return name, float(auroc_per_out_class[name])


def per_defect_type(dataset) -> dict[str, TaskView]:
    """For a defect set's test split: ``{defect_type: normals + that defect type}``, labels as parsed."""
    entries = _entries(dataset)
    normals = [i for i, e in enumerate(entries) if e.label == NORMAL]
    defects = list(dict.fromkeys(e.defect_type for e in entries if e.label == ANOMALOUS))
    out = {}
    for d in defects:
        idx = normals + [i for i, e in enumerate(entries) if e.label == ANOMALOUS and e.defect_type == d]
        out[d] = TaskView(dataset, idx, name=d)
    return out


def k_shot(dataset, k: int, seed: int = 0) -> TaskView:
    """K normal images drawn without replacement by ``seed`` (the same K for the same seed, whatever else runs)."""
    entries = _entries(dataset)
    normals = [i for i, e in enumerate(entries) if e.label in (NORMAL, -1)]
    if k > len(normals):
        raise DatasetError(f"k_shot: asked for K={k} normal images, the dataset has {len(normals)}")
    rng = np.random.default_rng(seed)
    chosen = sorted(int(normals[j]) for j in rng.choice(len(normals), size=k, replace=False))
    return TaskView(dataset, chosen, [NORMAL] * k, [GOOD] * k, name=f"{k}-shot-seed{seed}")


def split_support(dataset, n_style: int, n_content: int, seed: int = 0) -> tuple[TaskView, TaskView, TaskView]:
    """Random partition of a support set into X_style, X_content and the held-out normals X_in (the rest)."""
    n = len(dataset)
    if n_style < 1 or n_content < 1:
        raise DatasetError(f"split_support: n_style and n_content must be >= 1, got {n_style}, {n_content}")
    if n_style + n_content > n:
        raise DatasetError(
            f"split_support: the support set has {n} images, fewer than n_style + n_content = {n_style + n_content}"
        )
    perm = np.random.default_rng(seed).permutation(n)
    parts = (sorted(perm[:n_style]), sorted(perm[n_style : n_style + n_content]), sorted(perm[n_style + n_content :]))
    names = ("style", "content", "held-out")
    return tuple(  # type: ignore[return-value]
        TaskView(dataset, p, [NORMAL] * len(p), [GOOD] * len(p), name=nm) for p, nm in zip(parts, names)
    )


def anomalydiffusion_split(dataset, train_fraction: float = 1 / 3) -> tuple[TaskView, TaskView]:
    """AnomalyDiffusion's split of a defect set's anomalies, made disjoint: per defect type, the files sorted by id
    (their paths: MVTec's zero-padded ``000.png`` ...), the first ``⌊n · train_fraction⌋`` train the generator and
    the rest are test anomalies. The reference code puts image ``⌊n/3⌋`` on both sides; here no image is on both.

    Normals are not part of this split (they go to neither side; every good test image stays a test image). A
    defect type with too few anomalies for a disjoint split (nothing to train on, or nothing left to test: fewer
    than 3 at one third) is a :class:`DatasetError` naming the type and its count.
    """
    if not 0.0 < train_fraction < 1.0:
        raise DatasetError(f"anomalydiffusion_split: train_fraction must be in (0, 1), got {train_fraction}")
    entries = _entries(dataset)
    train, test = [], []
    for d in dict.fromkeys(e.defect_type for e in entries if e.label == ANOMALOUS):
        idx = sorted((i for i, e in enumerate(entries) if e.label == ANOMALOUS and e.defect_type == d),
                     key=lambda i: entries[i].image_path)
        n_train = int(np.floor(len(idx) * train_fraction + 1e-9))  # ⌊n/3⌋, immune to 1/3's rounding
        if n_train < 1 or n_train >= len(idx):
            need = int(np.ceil(1 / train_fraction - 1e-9))
            raise DatasetError(
                f"anomalydiffusion_split: defect type {d!r} has {len(idx)} anomalous image(s); a disjoint split with "
                f"train_fraction {train_fraction:.4g} gives {n_train} to train and {len(idx) - n_train} to test. "
                f"It needs at least {need} images of each defect type (at least one on each side)"
            )
        train += idx[:n_train]
        test += idx[n_train:]
    return (TaskView(dataset, train, name="anomalydiffusion-train"),
            TaskView(dataset, test, name="anomalydiffusion-test"))


def labelled_anomalies(dataset, normal: str, m: int, seed: int = 0) -> TaskView:
    """``m`` images of the other classes, drawn by ``seed`` and labelled 1: the few labelled anomalies that
    semi-supervised methods (EAP, SSDO) calibrate on. Take them from a training split, never from the test split."""
    _check_class(dataset, normal, "normal")
    entries = _entries(dataset)
    pool = [i for i, e in enumerate(entries) if e.category != normal]
    if not 1 <= m <= len(pool):
        raise DatasetError(f"labelled_anomalies: asked for m={m} anomalies, the other classes have {len(pool)} images")
    chosen = sorted(int(pool[j]) for j in np.random.default_rng(seed).choice(len(pool), size=m, replace=False))
    return TaskView(dataset, chosen, [ANOMALOUS] * m, [entries[i].category for i in chosen], name=f"{m}-labelled")


def labelled_anomalies_from(dataset_factory, normal: str, m: int, seed: int = 0, split: str = "train") -> TaskView:
    """:func:`labelled_anomalies` drawn from ``dataset_factory(split=split)`` (a parser partial, as configs hold)."""
    if split == "test":
        raise DatasetError("labelled anomalies must not come from the test split (it is what detectors are judged on)")
    return labelled_anomalies(dataset_factory(split=split), normal, m, seed)
