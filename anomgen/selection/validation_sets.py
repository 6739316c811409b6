"""The validation sets of a selection task, read from disk.

Selection only scores. The sets are made before, by ``train.py`` runs of generator models through the one export path
(one run per task in a ``foreach`` stage of the selection pipelines): ``model=diffstyle`` (the method) and the
baselines ``model=noise_set`` and ``model=dataset_set``. Every set of a task holds the same held-out normals (label 0,
the same split of the support set, recorded in ``set.json`` as ``split``) and its own anomalies (label 1), so the
sets differ only in their anomalies.

:func:`selection_task` reads a task's sets (a set folder, or a run folder whose ``run.json`` names its
``synthetic_set``), checks that they share the held-out normals and that these come from the task's support set, and
builds the banks: all of the support for real scoring, the support minus the held-out normals for synthetic scoring
and, with ``bank_without_sources``, minus the support images the anomalies were made from too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from torch.utils.data import Dataset

from anomgen.data.record import ANOMALOUS, NORMAL


def set_folder(path: str | Path) -> Path:
    """A synthetic set folder from ``path``: the folder itself when it holds a set, else the ``synthetic_set`` output
    of the run recorded in ``<path>/run.json`` (a ``train.py`` run of a generator model)."""
    path = Path(path)
    if (path / "set.json").is_file() or not (path / "run.json").is_file():
        return path  # a set (or a missing folder: the reader names it)
    outputs = json.loads((path / "run.json").read_text()).get("outputs") or {}
    if "synthetic_set" not in outputs:
        raise ValueError(f"run {path} exported no synthetic set (its outputs: {', '.join(sorted(outputs)) or 'none'})")
    return Path(outputs["synthetic_set"])


def held_out_normals(dataset) -> list[str]:
    """The source image paths of a set's normal rows (its held-out normals), in id order."""
    return [r["sources"][0] if r["sources"] else r["image"] for r in dataset.rows if r["label"] == NORMAL]


def selection_task(name: str, support: Dataset, test_set: Dataset, sets: Mapping[str, str | Path],
                   bank_without_sources: bool = False):
    """One task of model / prompt selection from its validation sets on disk (``sets``: set name -> set or run
    folder), scored against banks from ``support`` (the task's normal training images)."""
    from anomgen.data.synthetic import SyntheticSet
    from anomgen.data.tasks import TaskView
    from anomgen.selection.model_selection import SelectionTask

    if not sets:
        raise ValueError(f"selection task {name!r}: no validation set")
    size = tuple(support[0]["image"].shape[-2:])
    read = {set_name: SyntheticSet(set_folder(folder), image_size=size) for set_name, folder in sets.items()}
    support_paths = [e.image_path for e in support.entries]
    normals = {set_name: held_out_normals(dataset) for set_name, dataset in read.items()}
    first = next(iter(normals))
    for set_name, paths in normals.items():
        if not paths:
            raise ValueError(f"selection task {name!r}: set {set_name!r} ({read[set_name].root}) has no held-out "
                             "normal (label 0)")
        if paths != normals[first]:
            raise ValueError(f"selection task {name!r}: sets {first!r} and {set_name!r} hold different held-out "
                             f"normals ({len(normals[first])} vs {len(paths)}); make them with the same split "
                             f"(n_style, n_content, n_held_out, split_seed) of the same support set")
    outside = sorted(set(normals[first]) - set(support_paths))
    if outside:
        raise ValueError(f"selection task {name!r}: {len(outside)} held-out normal(s) of its sets are not in the "
                         f"task's support set (e.g. {outside[0]}): the sets were made for another task")
    held = set(normals[first])
    if bank_without_sources:
        held |= {s for dataset in read.values() for r in dataset.rows if r["label"] == ANOMALOUS
                 for s in r["sources"]} & set(support_paths)
        if len(held) >= len(support):
            raise ValueError(f"selection task {name!r}: bank_without_sources leaves no image in the synthetic bank "
                             f"(support {len(support)}, held out and sources {len(held)}); lower n_held_out or set "
                             "it false")
    synthetic_bank = TaskView(support, [i for i, p in enumerate(support_paths) if p not in held],
                              name=f"{name}-bank-without-held-out")
    return SelectionTask(name, support, synthetic_bank, test_set, read)
