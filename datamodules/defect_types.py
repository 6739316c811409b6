"""The defect-type classifier's data (``model=defect_classifier``, ``datamodule=defect_types``): a synthetic set's
generated anomalies, labelled by their manifest ``defect_type``, to train and to select on; the category's real
held-out anomalies to test on.

- **Classes** (``defect_types``): the sorted defect types of the set's anomalies; each record gets ``defect_label``,
  its type's index.
- **Train**: the set's anomalous samples (label 1) less the held-out ones, resized to the task's image size.
- **Validation** (checkpoint selection): ``val_fraction`` of each defect type's generated anomalies, held out by
  ``pairs_seed`` (at least one per type that has two or more): generated images only, never a real one.
  ``validation="none"``: no selection, the classifier keeps its last weights. ``validation="test"`` (or
  ``"synthetic"``) is refused: AnomalyDiffusion's reference keeps the epoch of best *test* accuracy, which is not done
  here.
- **Test**: the category's real anomalies that the generator did not learn from: the test split's anomalies, from
  which :class:`AnomalyDataModule` removed the generator's part (``anomaly_train_fraction``, 1/3 by default: the
  first ⌊n/3⌋ of each defect type by file id, :func:`anomgen.data.tasks.anomalydiffusion_split`, disjoint), normals
  excluded. A real defect type that the set does not hold is an error (its
  images could never be classified right).

Without ``pairs_set`` the datamodule still sets up (the task's splits, as :class:`AnomalyDataModule`), but its
loaders refuse to run, naming the setting.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from torch.utils.data import DataLoader, Dataset

from anomgen.data import tasks
from anomgen.errors import ConfigError, DatasetError
from datamodules.anomaly import AnomalyDataModule


class DefectLabels(Dataset):
    """``dataset``'s records with ``defect_label``: the index of the record's ``defect_type`` in ``defect_types``."""

    def __init__(self, dataset: Dataset, defect_types: Sequence[str]) -> None:
        self.dataset = dataset
        self.index = {t: i for i, t in enumerate(defect_types)}

    def __len__(self) -> int:
        return len(self.dataset)

    @property
    def entries(self):
        return self.dataset.entries

    def __getitem__(self, i: int) -> dict:
        record = self.dataset[i]
        record["defect_label"] = self.index[record["defect_type"]]
        return record


def holdout_per_type(types: Sequence[str], fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(kept, held out)`` positions of ``types``: per type (sorted), ``round(n · fraction)`` of its ``n`` positions
    held out (at least 1 when ``fraction > 0`` and ``n >= 2``; at least 1 always kept), drawn by ``seed``."""
    rng = np.random.default_rng(seed)
    kept, held = [], []
    for t in sorted(set(types)):
        idx = np.array([i for i, u in enumerate(types) if u == t])
        n_held = 0
        if fraction > 0 and len(idx) >= 2:
            n_held = min(max(1, round(len(idx) * fraction)), len(idx) - 1)
        perm = rng.permutation(len(idx))
        held += idx[perm[:n_held]].tolist()
        kept += idx[perm[n_held:]].tolist()
    return sorted(kept), sorted(held)


class DefectTypeDataModule(AnomalyDataModule):
    def __init__(
        self,
        *args,
        pairs_set: str | None = None,
        val_fraction: float = 0.2,
        pairs_seed: int = 0,
        **kwargs,
    ) -> None:
        """``pairs_set``: a synthetic set folder whose anomalies carry their ``defect_type``; ``val_fraction``,
        ``pairs_seed``: the held-out generated anomalies per type. The other arguments are :class:`AnomalyDataModule`'s
        (``protocol`` must be ``defects``; ``anomaly_train_fraction``, the part of each real defect type the generator
        trained on and that is left out of the test, defaults to AnomalyDiffusion's third)."""
        if kwargs.get("anomaly_train_fraction") is None:
            kwargs["anomaly_train_fraction"] = 1 / 3
        super().__init__(*args, **kwargs)
        if self.protocol != "defects":
            raise ConfigError(f"the defect-type classifier needs a defect dataset (datamodule.protocol=defects: MVTec "
                              f"AD, VisA, Folder), got protocol={self.protocol!r}")
        if self.validation not in ("holdout", "none"):
            raise ConfigError(f"the defect-type classifier selects its checkpoint on held-out generated anomalies "
                              f"(datamodule.validation=holdout) or keeps its last weights (none), got "
                              f"{self.validation!r}: checkpoints are never picked on the test split (the "
                              "AnomalyDiffusion reference does; its numbers say so)")
        if self.outlier_exposure_set:
            raise ConfigError("the defect-type classifier trains on datamodule.pairs_set; "
                              "datamodule.outlier_exposure_set is not used")
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ConfigError(f"datamodule.val_fraction must be in [0, 1), got {val_fraction!r}")
        self.pairs_set = None if not pairs_set else str(pairs_set)
        self.val_fraction, self.pairs_seed = float(val_fraction), int(pairs_seed)
        if self.pairs_set:
            self._read_pairs()  # a missing or empty set fails now, before any training
        self.defect_types: list[str] | None = None
        self.train_pairs = self.val_pairs = self.real_test = None

    def _read_pairs(self, image_size=None):
        from anomgen.data.synthetic import SyntheticSet

        pairs = SyntheticSet(self.pairs_set, image_size=image_size, labels=(1,))
        types = sorted({e.defect_type for e in pairs.entries})
        if len(types) < 2:
            raise DatasetError(f"the synthetic set {pairs.root} holds {len(pairs)} anomalies of defect types {types}; "
                               "a defect-type classifier needs at least two types")
        return pairs, types

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.train_pairs is not None or not self.pairs_set:
            return
        pairs, types = self._read_pairs(image_size=tuple(self.support[0]["image"].shape[-2:]))
        kept, held = holdout_per_type([e.defect_type for e in pairs.entries],
                                      self.val_fraction if self.validation == "holdout" else 0.0, self.pairs_seed)
        real = tasks.TaskView(self.test_set, [i for i, e in enumerate(self.test_set.entries) if e.label == 1],
                              name="real-test-anomalies")
        unknown = sorted({e.defect_type for e in real.entries} - set(types))
        if unknown:
            raise DatasetError(f"the real test anomalies have defect types {unknown} that the synthetic set "
                               f"{pairs.root} does not hold (its types: {types}); generate every type of the category")
        self.defect_types = types
        self.train_pairs = DefectLabels(tasks.TaskView(pairs, kept, name="train-pairs"), types)
        self.val_pairs = DefectLabels(tasks.TaskView(pairs, held, name="held-out-pairs"), types) if held else None
        self.real_test = DefectLabels(real, types)
        self.val_set = self.val_pairs

    def _require_pairs(self) -> None:
        if not self.pairs_set:
            raise ConfigError("datamodule.pairs_set is required: the synthetic set (a folder) whose anomalies, "
                              "labelled by their manifest defect_type, train the defect-type classifier")
        self.setup()

    def describe(self) -> dict:
        out = super().describe()
        if self.pairs_set:
            self.setup()
            out.update({
                "pairs_set": self.pairs_set, "defect_types": list(self.defect_types),
                "num_train_pairs": len(self.train_pairs),
                "num_val_pairs": 0 if self.val_pairs is None else len(self.val_pairs),
                "num_test_anomalies": len(self.real_test),
                "anomaly_train_fraction": self.anomaly_train_fraction,
                "selected_on": "held-out generated anomalies (never the test split)" if self.val_pairs is not None
                else "nothing: the last weights",
            })
        return out

    # -- loaders -------------------------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        self._require_pairs()
        return self._training_loader(self.train_pairs)

    def val_dataloader(self) -> DataLoader | list:
        self._require_pairs()
        return [] if self.val_pairs is None else self._loader(self.val_pairs, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self._require_pairs()
        return self._loader(self.real_test, shuffle=False)
