"""The localizer's data: :class:`AnomalyDataModule` whose training batches are half real normals (empty masks) and
half anomalous image–mask pairs, and whose validation is held-out normals + held-out *generated* pairs.

Pairs (``pairs``):

- ``"perlin"`` (the default when no set is given): DRAEM's Perlin pairs made on the fly from the normal training
  images (:class:`~anomgen.generators.perlin.PerlinPairs`, anomalib's generator, offline), a new pair for every
  draw, seeded by the draw's index (``pairs_seed``); ``perlin``: the generator's settings;
- ``"set"`` (the default when ``pairs_set`` is given): the anomalies of a synthetic set with masks (AnomalyDiffusion's
  pairs, ...), resized to the task's image size; a set whose anomalies have no mask is refused at construction;
- ``"anomaly_train"``: the *real* anomalies set aside for generators (``anomaly_train_fraction``: the first third of
  each defect type, never in the test split) with their ground-truth masks: the oracle a generator's pairs are
  compared with (a localizer trained on the few real anomalies a generator learns from).

An epoch is ``samples_per_epoch`` draws (500: AnomalyDiffusion's loaders), even draws normals and odd draws pairs,
numbered across epochs (:class:`~anomgen.data.pairs.EpochDraws`), so that every epoch sees new Perlin pairs.

Validation (checkpoint selection) never reads the test split: ``validation="holdout"`` (default) gives the normals
held out of training (``holdout_fraction``) and ``val_pairs_per_normal`` generated pairs per held-out normal: Perlin
pairs of those held-out normals (their own seed stream), or a seeded part of the set's pairs, which then leaves
training (with ``"anomaly_train"``: a seeded part of those real anomalies, held out of training as a set's
pairs are). ``validation="none"``: no validation (the localizer keeps its last weights). ``validation="test"`` is
refused: the AnomalyDiffusion reference picks its checkpoint on the test set, which is not done here.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch.utils.data import ConcatDataset, DataLoader, Dataset

from anomgen.data import tasks
from anomgen.data.pairs import EpochDraws, MixedPairs, RecordPairs, holdout_split, synthetic_pairs
from anomgen.errors import ConfigError
from datamodules.anomaly import AnomalyDataModule

PAIR_SOURCES = ("perlin", "set", "anomaly_train")


class LocalizerDataModule(AnomalyDataModule):
    def __init__(
        self,
        *args,
        pairs: str | None = None,
        pairs_set: str | None = None,
        samples_per_epoch: int = 500,
        val_pairs_per_normal: int = 2,
        pairs_seed: int = 0,
        perlin: Mapping | None = None,
        **kwargs,
    ) -> None:
        """``pairs``: ``"perlin"`` | ``"set"`` | ``"anomaly_train"`` | ``None`` (``"set"`` when ``pairs_set`` is
        given, else ``"perlin"``); ``pairs_set``: a synthetic set folder with masks; ``perlin``: keyword arguments of
        :class:`~anomgen.generators.perlin.PerlinAnomalies` (``blend_factor``, ``rotation_range``, ``dual_mask``,
        ``anomaly_source_path``). The other arguments are :class:`AnomalyDataModule`'s."""
        super().__init__(*args, **kwargs)
        if self.validation not in ("holdout", "none"):
            raise ConfigError(f"the localizer's validation is held-out normals + held-out generated pairs "
                              f"(datamodule.validation=holdout) or none, got {self.validation!r}: checkpoints are "
                              "never picked on the test split (the AnomalyDiffusion reference does; its numbers say "
                              "so)")
        if self.train_transform is not None or self.train_repeats != 1 or self.outlier_exposure_set:
            raise ConfigError("the localizer's training data are its pairs: datamodule.train_transform, "
                              "train_repeats and outlier_exposure_set are not used (samples_per_epoch sets an "
                              "epoch's length)")
        if pairs is None:
            pairs = "set" if pairs_set else "perlin"
        if pairs not in PAIR_SOURCES:
            raise ConfigError(f"datamodule.pairs must be one of {PAIR_SOURCES} (or null: set when pairs_set is "
                              f"given, else perlin), got {pairs!r}")
        if pairs == "set" and not pairs_set:
            raise ConfigError("datamodule.pairs=set needs datamodule.pairs_set: a synthetic set folder of anomaly "
                              "image-mask pairs")
        if pairs != "set" and pairs_set:
            raise ConfigError(f"datamodule.pairs={pairs} but datamodule.pairs_set={pairs_set!r} is given: choose one "
                              "(pairs=set, or drop pairs_set)")
        if pairs == "anomaly_train" and self.anomaly_train_fraction is None:
            raise ConfigError("datamodule.pairs=anomaly_train trains on the real anomalies set aside for generators: "
                              "set datamodule.anomaly_train_fraction (AnomalyDiffusion: 0.3333333333333333)")
        if int(val_pairs_per_normal) < 0:
            raise ConfigError(f"datamodule.val_pairs_per_normal must be >= 0, got {val_pairs_per_normal}")
        self.pairs = pairs
        self.pairs_set = None if not pairs_set else str(pairs_set)
        self.samples_per_epoch = int(samples_per_epoch)
        self.val_pairs_per_normal = int(val_pairs_per_normal)
        self.pairs_seed = int(pairs_seed)
        self.perlin = dict(perlin or {})
        if self.pairs == "set":
            synthetic_pairs(self.pairs_set)  # a set without masks is refused now, before any training
        self.train_pairs = self.val_pairs = None

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.train_pairs is not None:
            return
        size = tuple(self.support[0]["image"].shape[-2:])
        n_val = 0 if self.validation == "none" else self.val_pairs_per_normal * len(self.val_normals)
        if self.pairs in ("set", "anomaly_train"):
            every = (synthetic_pairs(self.pairs_set, image_size=size) if self.pairs == "set"
                     else self.anomaly_train)
            n_val = min(n_val, len(every) - 1)  # at least one pair left to train on
            kept, held = holdout_split(len(every), n_val, self.pairs_seed)
            self.train_pairs = RecordPairs(tasks.TaskView(every, kept, name="train-pairs"))
            self.val_pairs = tasks.TaskView(every, held, name="held-out-pairs") if held else None
        else:
            from anomgen.generators.perlin import PerlinAnomalies, PerlinPairs

            self.train_pairs = PerlinPairs(self.support, PerlinAnomalies(seed=self.pairs_seed, **self.perlin))
            # the held-out normals' own pairs, from another seed stream than training's
            self.val_pairs = PerlinPairs(self.val_normals, PerlinAnomalies(seed=self.pairs_seed + 1, **self.perlin),
                                         length=n_val) if n_val else None
        parts: list[Dataset] = [d for d in (self.val_normals, self.val_pairs)
                                if d is not None and len(d) and self.validation != "none"]
        self.val_set = ConcatDataset(parts) if parts else None

    def describe(self) -> dict:
        out = super().describe()
        out.update(self.describe_pairs())
        return out

    def describe_pairs(self) -> dict:
        """What the localizer trains and selects on (kept in its weights file)."""
        self.setup()
        perlin = self.train_pairs.anomalies.params if self.pairs == "perlin" else None
        return {"pairs": self.pairs, "pairs_set": self.pairs_set, "pairs_seed": self.pairs_seed,
                "samples_per_epoch": self.samples_per_epoch, "perlin": perlin,
                "num_val_normals": len(self.val_normals) if self.validation != "none" else 0,
                "num_val_pairs": 0 if self.val_pairs is None else len(self.val_pairs),
                "num_train_pairs": None if self.pairs == "perlin" else len(self.train_pairs),
                "selected_on": "held-out normals + held-out generated pairs (never the test split)"}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            MixedPairs(self.support, self.train_pairs, self.samples_per_epoch),
            batch_size=self.batch_size,
            sampler=EpochDraws(self.samples_per_epoch, self.pairs_seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
