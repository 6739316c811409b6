"""FID early stopping: every N training steps, sample M images, compute their FID against the normal training
images, log the curve, stop when the FID reaches a target, and export a synthetic set when the FID enters a band.

FITYMI stops the score-SDE early on purpose: samples of a model that is not yet converged are near-distribution
anomalies. The target is an absolute FID (``target``) or ``target_factor`` × a reference FID, the FID between held-out
real normals and the training normals (what a converged model would reach).

Which real images: with an absolute ``target`` (the paper's 40 / 200) or no target, the FID is against **every normal
training image** of the datamodule, the held-out ones included (``train_normals`` + ``val_normals``); the paper
experiments also train the SDE and count its fakes on all of them (``configs/fitymi/paper.yaml``: the sde stage runs
with ``datamodule.validation=none``). With ``target_factor`` the held-out normals are the datamodule's holdout
(``datamodule.validation=holdout``: ``holdout_fraction`` of the normal training images, drawn with ``holdout_seed``);
the FID is then against the other training normals (``train_normals``), which are also all the SDE trains on, its fake
count and the kNN bank, while the reference FID is held-out vs ``train_normals``. ``bands`` (e.g. ``[[300, null],
[100, 200], [30, 50], [null, 20]]``) export ``<export_dir>/fid_<lo>-<hi>`` the first time the FID falls in each band,
with the FID in every manifest row (and ``train/fid_band_export``, the FID of that check, in the log). Checks every
``every_n_steps`` can overshoot the target by far when the FID falls fast (Animal-MNIST: 159 -> 52 within 50 steps,
against a target of ~120): ``refine_every_n_steps`` checks that often instead once a check's FID is within
``refine_factor`` × the target, so the stop lands near the target from below for a few extra checks. Each check's
first ``grid_size`` samples go to the loggers as an image grid (``train/fid_samples``); the curve is ``train/fid``,
with ``train/fid_target`` and ``train/fid_reference``.
Features come from any ``nn.Module`` (raw pixels for small images; Inception where its weights are available). The
LightningModule provides ``sample(indices, seed) -> images in [0, 1]``; the samples of a check are seeded by their
index. Under DDP each rank makes its share of a check's samples (sample i on rank i mod world) and every rank gathers
all their features, so a check measures the same samples as on one device at 1/world of the sampling; rank 0's FID is
broadcast and used by every rank, so that the stop, the band exports and the logged curve agree even where devices
round differently.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning.pytorch import Callback
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader

from anomgen.data.generation import GeneratedBatch
from anomgen.data.synthetic import write_set
from anomgen.distributed import gather_strided
from anomgen.encoders.base import extract_features
from anomgen.errors import ConfigError
from anomgen.metrics.generation import feature_statistics, frechet_distance
from anomgen.progress import progress
from anomgen.visualize import image_grid
from callbacks.image_log import log_image

log = logging.getLogger(__name__)


def band_name(band) -> str:
    lo, hi = band
    return f"fid_{'0' if lo is None else f'{lo:g}'}-{'inf' if hi is None else f'{hi:g}'}"


def in_band(fid: float, band) -> bool:
    lo, hi = band
    return (lo is None or fid >= lo) and (hi is None or fid <= hi)


class FIDEarlyStopping(Callback):
    def __init__(
        self,
        feature_extractor: nn.Module,
        every_n_steps: int = 100,
        num_samples: int = 256,
        target: float | None = None,
        target_factor: float | None = None,
        bands: list | None = None,
        export_dir: str | None = None,
        export_size: int | None = None,
        sample_seed: int = 10_000,
        batch_size: int = 256,
        grid_size: int = 16,
        refine_every_n_steps: int | None = None,
        refine_factor: float = 2.0,
    ) -> None:
        if target is not None and target_factor is not None:
            raise ConfigError("give FID early stopping either callbacks.fid_early_stopping.target (absolute) or "
                              "target_factor (× reference), not both")
        if bands and export_dir is None:
            raise ConfigError("FID bands export synthetic sets: set callbacks.fid_early_stopping.export_dir")
        if refine_every_n_steps is not None:
            if target is None and target_factor is None:
                raise ConfigError("callbacks.fid_early_stopping.refine_every_n_steps refines the checks near the "
                                  "target: set target or target_factor")
            if not 0 < refine_every_n_steps <= every_n_steps:
                raise ConfigError(f"callbacks.fid_early_stopping.refine_every_n_steps must be in "
                                  f"1..every_n_steps ({every_n_steps}), got {refine_every_n_steps}")
            if refine_factor <= 1:
                raise ConfigError(f"callbacks.fid_early_stopping.refine_factor is a multiple of the target above which "
                                  f"checks stay coarse: > 1, got {refine_factor}")
        self.extractor = feature_extractor.eval()
        self.every_n_steps, self.num_samples = every_n_steps, num_samples
        self.target, self.target_factor = target, target_factor
        self.bands = [tuple(b) for b in (bands or [])]
        self.export_dir = None if export_dir is None else Path(export_dir)
        self.export_size, self.sample_seed, self.batch_size = export_size, sample_seed, batch_size
        self.grid_size = grid_size  # samples of each check logged as a grid (0: none)
        self.refine_every_n_steps, self.refine_factor = refine_every_n_steps, refine_factor
        self.last_samples: torch.Tensor | None = None
        self.curve: list[tuple[int, float]] = []
        self.exported: dict[str, float] = {}
        self.reference_fid: float | None = None
        self.stopped_at: tuple[int, float] | None = None
        self._real_stats = None

    # -- the FID ---------------------------------------------------------------------------------------------
    def _stats(self, images_or_loader):
        feats = extract_features(self.extractor, images_or_loader, desc="fid: features")
        return feature_statistics(feats)

    def _real(self, trainer):
        if self._real_stats is None:
            dm = trainer.datamodule
            real = dm.train_normals
            if self.target_factor is None and len(dm.val_normals) > 0:  # every normal training image
                real = ConcatDataset([dm.train_normals, dm.val_normals])
            self._real_stats = self._stats(DataLoader(real, batch_size=self.batch_size))
            if self.target_factor is not None and self.reference_fid is None:
                if len(dm.val_normals) < 2:
                    raise ConfigError("callbacks.fid_early_stopping.target_factor needs held-out normals for the "
                                      "reference FID (datamodule.validation=holdout with holdout_fraction > 0)")
                held_out = self._stats(DataLoader(dm.val_normals, batch_size=self.batch_size))
                self.reference_fid = float(frechet_distance(*held_out, *self._real_stats))
        return self._real_stats

    @property
    def target_fid(self) -> float | None:
        if self.target is not None:
            return float(self.target)
        if self.target_factor is not None and self.reference_fid is not None:
            return float(self.target_factor * self.reference_fid)
        return None

    @property
    def check_interval(self) -> int:
        """Steps between checks: ``refine_every_n_steps`` once the last check is within ``refine_factor`` × the
        target, ``every_n_steps`` otherwise."""
        target = self.target_fid
        if self.refine_every_n_steps and self.curve and target is not None \
                and self.curve[-1][1] <= self.refine_factor * target:
            return self.refine_every_n_steps
        return self.every_n_steps

    def _samples(self, pl_module, indices: list[int], seed: int, desc: str = "FID check: sampling") -> torch.Tensor:
        chunks = [indices[i : i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        return torch.cat([pl_module.sample(c, seed=seed).cpu() for c in progress(chunks, desc=desc)])

    def measure(self, trainer, pl_module) -> float:
        """The FID of ``num_samples`` samples (seeded by their index) against the real normals. Under DDP the sampling
        is split over the ranks: rank r makes samples r, r + world, ... and the features of all are gathered
        (:func:`~anomgen.distributed.gather_strided`), so a check costs 1/world of the sampling and measures the
        same samples as on one device. The grid of a check shows rank 0's first samples."""
        real = self._real(trainer)
        world, rank = max(int(trainer.world_size), 1), int(trainer.global_rank)
        if self.num_samples < world:
            raise ConfigError(f"callbacks.fid_early_stopping.num_samples ({self.num_samples}) must be at least the "
                              f"number of processes ({world}): each samples its share of a check")
        images = self._samples(pl_module, list(range(rank, self.num_samples, world)), self.sample_seed)
        self.last_samples = images[: self.grid_size]
        features = extract_features(self.extractor, [{"image": images}], desc="fid: features")
        if world > 1:
            features = gather_strided(trainer.strategy, features, self.num_samples, device=pl_module.device)
        return float(frechet_distance(*feature_statistics(features), *real))

    # -- hooks -----------------------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == 0 or step % self.check_interval or (self.curve and self.curve[-1][0] == step):
            return
        was_training = pl_module.training
        pl_module.eval()
        # every rank measures the same gathered features; rank 0's value decides (another device may round differently)
        fid = float(trainer.strategy.broadcast(self.measure(trainer, pl_module), src=0))
        pl_module.train(was_training)
        self.curve.append((step, fid))
        pl_module.last_fid = fid
        if trainer.is_global_zero:
            self._announce(fid, step)
        if trainer.is_global_zero and self.grid_size and self.last_samples is not None:
            grid = image_grid(self.last_samples)
            for logger in trainer.loggers:
                log_image(logger, "train/fid_samples", grid, step=step)
        pl_module.log("train/fid", fid, on_step=True, on_epoch=False, rank_zero_only=False)
        if self.target_fid is not None:
            pl_module.log("train/fid_target", self.target_fid, on_step=True, on_epoch=False, rank_zero_only=False)
        if self.reference_fid is not None:  # held-out real normals against the training normals
            pl_module.log("train/fid_reference", self.reference_fid, on_step=True, on_epoch=False,
                          rank_zero_only=False)
        entered = [band_name(b) for b in self.bands if in_band(fid, b) and band_name(b) not in self.exported]
        for name in entered:
            self._export(trainer, pl_module, name, fid)
        if entered:  # a point on the FID curve where band sets were exported (their names are in run.json)
            pl_module.log("train/fid_band_export", fid, on_step=True, on_epoch=False, rank_zero_only=False)
        target = self.target_fid
        if target is not None and fid <= target:
            self.stopped_at = (step, fid)
            trainer.should_stop = True

    def _announce(self, fid: float, step: int) -> None:
        """One line per check: ``FID 45.20 at step 100 (target 6.26)``, or ``FID 2.03 ≤ target 6.26 at step 150:
        stopping``."""
        target = self.target_fid
        if target is not None and fid <= target:
            log.info("FID %.2f ≤ target %.2f at step %d: stopping", fid, target, step)
        else:
            log.info("FID %.2f at step %d%s", fid, step, "" if target is None else f" (target {target:.2f})")

    @property
    def stage_outputs(self) -> dict:
        """What the run records (``run.json``): the folder of the FID-band sets, when any was exported."""
        return {"fid_bands": str(self.export_dir.resolve())} if self.exported else {}

    def _export(self, trainer, pl_module, name: str, fid: float) -> None:
        self.exported[name] = fid
        out = self.export_dir / name
        if trainer.is_global_zero:
            n = self.export_size or len(trainer.datamodule.support)
            seed = getattr(pl_module, "seed", 0)
            images = self._samples(pl_module, list(range(n)), seed, desc=f"FID band {name}: sampling")
            category = trainer.datamodule.normal_class or ""
            generator = pl_module.generator_name
            batch = GeneratedBatch(
                index=torch.arange(n), image=images, mask=None, label=torch.ones(n, dtype=torch.long),
                generator=generator, category=[category] * n, defect_type=[generator] * n,
                sources=[[] for _ in range(n)],
                params=[{"fid": fid, "step": trainer.global_step, "seed": seed} for _ in range(n)],
            )
            write_set(out, batch, {"generator": generator, "fid": fid, "band": name, "step": trainer.global_step},
                      overwrite=True)
            log.info("FID %.2f in band %s at step %d: exported %d samples to %s", fid, name, trainer.global_step, n,
                     out)
        trainer.strategy.barrier("fid_early_stopping:export")

    # -- resuming continues the schedule ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"curve": self.curve, "exported": self.exported, "reference_fid": self.reference_fid,
                "stopped_at": self.stopped_at}

    def load_state_dict(self, state: dict) -> None:
        self.curve = [tuple(p) for p in state.get("curve", [])]
        self.exported = dict(state.get("exported", {}))
        self.reference_fid = state.get("reference_fid")
        self.stopped_at = state.get("stopped_at")

