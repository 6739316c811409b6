"""One DataModule for every dataset: the parser comes in by config, the task protocol is config.

- ``protocol="one_vs_rest"`` (multi-class sets: digits, Animal-MNIST, CUB, Flowers, CIFAR): ``normal_class`` is
  normal; training uses its training images, the test split labels every other class anomalous (per out-class
  figures come from grouping by ``defect_type``).
- ``protocol="defects"`` (MVTec AD, VisA, Folder): the dataset's category; training images are all normal, the test
  split is labelled by the parser.

Validation never comes from the test split unless ``validation="test"`` says so by name:
``"holdout"`` (a seeded fraction of the normal training images, which then leave training), ``"synthetic"``
(those held-out normals + the anomalies of ``synthetic_set``), ``"test"`` or ``"none"``.
The support set (what generators start from, and the kNN bank) is the training normals or ``k_shot`` of them.
With ``outlier_exposure_set`` (a synthetic set folder) training batches hold the support normals (label 0) and that
set's anomalies (label 1), each with a ``target`` for the head (see :class:`OutlierExposureSet`).

Generators that learn from a few real anomalies (AnomalyDiffusion) take them from the test split, so the split is the
datamodule's, made once for every stage of an experiment: with ``anomaly_train_fraction`` (``protocol="defects"``),
:func:`anomgen.data.tasks.anomalydiffusion_split` gives ``anomaly_train`` (per defect type, the first fraction of
the anomalies by file name, with their masks) and the test split keeps every good test image and only the other
anomalies, so that no stage evaluates on what a generator learned from. ``train_on="anomaly_train"`` makes those
anomalies the training data (the stages that learn from them); ``"support"`` (default) trains on the normals.
Under DDP Lightning gives every loader a distributed sampler (an unrepeated one for prediction).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from lightning.pytorch import LightningDataModule
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from anomgen.data import tasks
from anomgen.data.generation import GenerationRequests
from anomgen.data.record import GOOD, NORMAL
from anomgen.errors import ConfigError, SyntheticSetError
from anomgen.runtime import loader_workers

PROTOCOLS = ("one_vs_rest", "defects")
VALIDATION_SOURCES = ("holdout", "synthetic", "test", "none")
TRAIN_SOURCES = ("support", "anomaly_train")


class TransformedView(Dataset):
    """Apply ``transform`` (image tensor -> image tensor) to the ``image`` of each record."""

    def __init__(self, dataset: Dataset, transform: Callable) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        record = self.dataset[i]
        record["image"] = self.transform(record["image"])
        return record


class OutlierExposureSet(Dataset):
    """Real normals (label 0) followed by a synthetic set's anomalies (label 1), each record with a ``target``:
    the label, or, with ``target_key``, the anomaly's ``params[target_key]`` from the manifest (0 for normals) for
    a regression head (e.g. the edit strength α)."""

    def __init__(self, normals: Dataset, synthetic_set: str, target_key: str | None = None, image_size=None) -> None:
        from anomgen.data.synthetic import SyntheticSet

        self.normals = normals
        self.anomalies = SyntheticSet(synthetic_set, image_size=image_size, labels=(1,))
        self.target_key = target_key
        if target_key is not None:
            missing = [r["id"] for r in self.anomalies.rows if target_key not in r["params"]]
            if missing:
                raise SyntheticSetError(f"synthetic set {synthetic_set}: {len(missing)} anomalies have no "
                                        f"params.{target_key} (e.g. id {missing[0]}); the regression head needs it")

    def __len__(self) -> int:
        return len(self.normals) + len(self.anomalies)

    def __getitem__(self, i: int) -> dict:
        if i < len(self.normals):
            record = self.normals[i]
            record["target"] = 0.0
            return record
        j = i - len(self.normals)
        record = self.anomalies[j]
        value = record["label"] if self.target_key is None else self.anomalies.rows[j]["params"][self.target_key]
        record["target"] = float(value)
        return record


class AnomalyDataModule(LightningDataModule):
    def __init__(
        self,
        dataset: Callable[..., Dataset],
        protocol: str = "one_vs_rest",
        normal_class: str | int | None = None,
        k_shot: int | None = None,
        support_seed: int = 0,
        validation: str = "holdout",
        holdout_fraction: float = 0.1,
        holdout_seed: int = 0,
        synthetic_set: str | None = None,
        num_generated: int | None = None,
        train_split: str = "train",
        test_split: str = "test",
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int | None = 0,
        train_transform: Callable | None = None,
        outlier_exposure_set: str | None = None,
        outlier_exposure_target: str | None = None,
        train_repeats: int = 1,
        anomaly_train_fraction: float | None = None,
        train_on: str = "support",
    ) -> None:
        """``train_repeats``: the training loader passes over its data that many times per epoch (a few-shot support
        set of K images would otherwise make epochs of one step, each with its own validation and checkpoint).
        ``anomaly_train_fraction``: the share of each defect type's test anomalies set aside as ``anomaly_train``
        (AnomalyDiffusion: 1/3) and removed from the test split; ``train_on``: ``"support"`` or
        ``"anomaly_train"``, what the training loader yields."""
        super().__init__()
        if protocol not in PROTOCOLS:
            raise ConfigError(f"datamodule.protocol must be one of {PROTOCOLS}, got {protocol!r}")
        if protocol == "one_vs_rest" and normal_class is None:
            raise ConfigError("datamodule.normal_class is required with protocol=one_vs_rest (which class is normal)")
        if validation not in VALIDATION_SOURCES:
            raise ConfigError(f"datamodule.validation must be one of {VALIDATION_SOURCES}, got {validation!r}")
        if validation == "synthetic" and not synthetic_set:
            raise ConfigError("datamodule.validation=synthetic needs datamodule.synthetic_set (a synthetic set folder)")
        if not 0.0 <= holdout_fraction < 1.0:
            raise ConfigError(f"datamodule.holdout_fraction must be in [0, 1), got {holdout_fraction}")
        self.dataset_factory = dataset
        self.protocol = protocol
        self.normal_class = None if normal_class is None else str(normal_class)
        self.k_shot, self.support_seed = k_shot, support_seed
        self.validation = validation
        self.holdout_fraction, self.holdout_seed = holdout_fraction, holdout_seed
        self.synthetic_set = synthetic_set
        self.num_generated = num_generated
        self.train_split, self.test_split = train_split, test_split
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = loader_workers(num_workers)  # null: min(4, the CPUs this process may use - 1)
        self.train_transform = train_transform
        self.outlier_exposure_set = outlier_exposure_set
        self.outlier_exposure_target = outlier_exposure_target
        if int(train_repeats) < 1:
            raise ConfigError(f"datamodule.train_repeats must be >= 1, got {train_repeats}")
        self.train_repeats = int(train_repeats)
        if anomaly_train_fraction is not None:
            if protocol != "defects":
                raise ConfigError("datamodule.anomaly_train_fraction needs protocol=defects (a defect set whose test "
                                  f"anomalies have masks: MVTec AD, VisA, Folder), got protocol={protocol!r}")
            if not 0.0 < float(anomaly_train_fraction) < 1.0:
                raise ConfigError(f"datamodule.anomaly_train_fraction must be in (0, 1), got {anomaly_train_fraction}")
        if train_on not in TRAIN_SOURCES:
            raise ConfigError(f"datamodule.train_on must be one of {TRAIN_SOURCES}, got {train_on!r}")
        if train_on == "anomaly_train" and anomaly_train_fraction is None:
            raise ConfigError("datamodule.train_on=anomaly_train needs datamodule.anomaly_train_fraction (e.g. 1/3: "
                              "the share of each defect type's test anomalies set aside for training)")
        self.anomaly_train_fraction = None if anomaly_train_fraction is None else float(anomaly_train_fraction)
        self.train_on = train_on
        self.train_normals = self.val_normals = self.support = self.test_set = self.val_set = None
        self.anomaly_train = None

    # -- building the splits -------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_normals is not None:
            return
        train_full = self.dataset_factory(split=self.train_split)
        if self.protocol == "one_vs_rest":
            normals = tasks.normal_class(train_full, self.normal_class)
        else:
            idx = [i for i, e in enumerate(train_full.entries) if e.label in (NORMAL, -1)]
            normals = tasks.TaskView(train_full, idx, [NORMAL] * len(idx), [GOOD] * len(idx), name="train-good")
        n_holdout = 0
        if self.validation in ("holdout", "synthetic") and self.holdout_fraction > 0:
            # at least one held-out normal, and at least one left to train on
            n_holdout = min(max(1, round(len(normals) * self.holdout_fraction)), len(normals) - 1)
        perm = np.random.default_rng(self.holdout_seed).permutation(len(normals))
        self.val_normals = tasks.TaskView(normals, sorted(perm[:n_holdout]), name="holdout-normals")
        self.train_normals = tasks.TaskView(normals, sorted(perm[n_holdout:]), name="train-normals")
        self.support = (
            tasks.k_shot(self.train_normals, self.k_shot, seed=self.support_seed) if self.k_shot else self.train_normals
        )
        test_full = self.dataset_factory(split=self.test_split)
        self.test_set = tasks.one_vs_rest(test_full, self.normal_class) if self.protocol == "one_vs_rest" else test_full
        if self.anomaly_train_fraction is not None:
            # the generator's anomalies leave the test split: it keeps every good image and the other anomalies
            self.anomaly_train, held = tasks.anomalydiffusion_split(self.test_set, self.anomaly_train_fraction)
            normals = [i for i, e in enumerate(self.test_set.entries) if e.label == NORMAL]
            self.test_set = tasks.TaskView(self.test_set, sorted(normals + held.indices),
                                           name="test-without-anomaly-train")
        if self.validation == "holdout":
            self.val_set = self.val_normals
        elif self.validation == "synthetic":
            from anomgen.data.synthetic import SyntheticSet

            self.val_set = ConcatDataset([self.val_normals, SyntheticSet(self.synthetic_set, labels=(1,))])
        elif self.validation == "test":
            self.val_set = self.test_set
        else:
            self.val_set = None

    def describe(self) -> dict:
        """What the task is, for the set.json of exported sets and for reports."""
        self.setup()
        return {
            "dataset": getattr(self.dataset_factory, "func", self.dataset_factory).__name__,
            "dataset_kwargs": {k: str(v) for k, v in getattr(self.dataset_factory, "keywords", {}).items()},
            "protocol": self.protocol,
            "normal_class": self.normal_class,
            "k_shot": self.k_shot,
            "support_seed": self.support_seed,
            "support_size": len(self.support),
            "validation": self.validation,
            "num_train_normals": len(self.train_normals),
            "num_val_normals": len(self.val_normals),
            "num_test": len(self.test_set),
            "anomaly_train_fraction": self.anomaly_train_fraction,
            "num_anomaly_train": None if self.anomaly_train is None else len(self.anomaly_train),
        }

    # -- loaders -------------------------------------------------------------------------------------------------
    def _loader(self, dataset: Dataset, shuffle: bool, batch_size: int | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size or self.eval_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        data = self.anomaly_train if self.train_on == "anomaly_train" else self.support
        if self.outlier_exposure_set:  # outlier exposure: the support normals + the synthetic set's anomalies
            data = OutlierExposureSet(self.support, self.outlier_exposure_set, self.outlier_exposure_target,
                                      image_size=self.support[0]["image"].shape[-2:])
        return self._training_loader(data)

    def _training_loader(self, data: Dataset) -> DataLoader:
        """The training loader of ``data``: ``train_transform`` applied, ``train_repeats`` passes, shuffled."""
        if self.train_transform is not None:
            data = TransformedView(data, self.train_transform)
        if self.train_repeats > 1:
            data = ConcatDataset([data] * self.train_repeats)
        return self._loader(data, shuffle=True, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader | list:
        return [] if self.val_set is None else self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """What the model is asked to generate: one request per sample by default (:class:`GenerationRequests`);
        a model that plans its own set (e.g. DiffStyle's style × content product) has ``predict_requests(support)``,
        a pure function returning the request dataset (the model builds its own copy of the plan in its setup).
        """
        model = self.trainer.lightning_module if self.trainer is not None else None
        plan = getattr(model, "predict_requests", None)
        requests = plan(self.support) if plan is not None else GenerationRequests(self.support, self.num_generated)
        return self._loader(requests, shuffle=False)

    def support_dataloader(self) -> DataLoader:
        """The support set in order (no shuffle): the normal bank of kNN detectors."""
        return self._loader(self.support, shuffle=False)
