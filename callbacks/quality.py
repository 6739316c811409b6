"""Score the exported synthetic set with a quality scorer (EAP by default) and keep the best part as a new set.

Runs after :class:`~callbacks.export.SyntheticSetExport` (list it after that callback), on rank 0: the scores go into
the set's manifest (``scores[key]``) and ``<set>_<key>_top`` holds the normals and the ``keep_fraction`` best
anomalies. The algorithm lives in :mod:`anomgen.quality.set_scoring`.

What it logs (W&B, TensorBoard; PNGs in ``images_dir`` for every logger): ``quality/<key>_histogram``, the scores of
the set's anomalies with the kept part stacked in red; ``quality/<key>_kept`` and ``quality/<key>_dropped``, grids of
the best-scored kept anomalies and of the worst-scored dropped ones (up to ``max_images`` each, best first / worst
first); and the numbers ``quality/<key>_kept`` (how many), ``quality/<key>_min_kept`` (the lowest kept score).
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback
from torch import nn
from torch.utils.data import Dataset

from anomgen.data.synthetic import SyntheticSet, read_manifest
from anomgen.errors import ConfigError
from anomgen.quality.set_scoring import score_set, select_top
from anomgen.visualize import image_grid, save_png, score_histogram
from callbacks.export import SyntheticSetExport
from callbacks.image_log import log_image


class QualityFilter(Callback):
    def __init__(
        self,
        scorer,
        extractor: nn.Module,
        labelled_anomalies: Dataset,
        key: str = "eap",
        keep_fraction: float = 1 / 3,
        dirpath: str | None = None,
        overwrite: bool = False,
        max_images: int = 16,
        images_dir: str | None = None,
    ) -> None:
        self.scorer, self.extractor, self.labelled_anomalies = scorer, extractor, labelled_anomalies
        self.key, self.keep_fraction = key, keep_fraction
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.overwrite = overwrite
        self.max_images = int(max_images)
        self.images_dir = None if images_dir is None else Path(images_dir)
        self.selected: Path | None = None

    @property
    def stage_outputs(self) -> dict:
        """What the run records (``run.json``): the kept set, as ``synthetic_set_<key>_top``."""
        return {} if self.selected is None else {f"synthetic_set_{self.key}_top": str(self.selected.resolve())}

    def setup(self, trainer, pl_module, stage: str) -> None:
        """When fitting (or generating) starts, not after the generation: the set is scored once exported, so a
        :class:`~callbacks.export.SyntheticSetExport` must be listed before this callback."""
        callbacks = list(trainer.callbacks)
        before = callbacks[: callbacks.index(self)] if self in callbacks else callbacks
        if not any(isinstance(c, SyntheticSetExport) for c in before):
            raise ConfigError("callbacks.quality_filter scores the exported set: list callbacks.synthetic_set_export "
                              "before it (callbacks=eap does)")

    def on_predict_end(self, trainer, pl_module) -> None:
        export = next((c for c in trainer.callbacks if isinstance(c, SyntheticSetExport)), None)
        if export is None or export.exported is None:
            raise RuntimeError("QualityFilter: the SyntheticSetExport callback exported no set to score")
        out = self.dirpath or export.dirpath.with_name(f"{export.dirpath.name}_{self.key}_top")
        if trainer.is_global_zero:
            scores = score_set(export.dirpath, self.scorer, self.extractor, trainer.datamodule.support,
                               self.labelled_anomalies, key=self.key)
            select_top(export.dirpath, out, self.key, self.keep_fraction, overwrite=self.overwrite)
            self._log(trainer, export.dirpath, out, scores)
        trainer.strategy.barrier("quality_filter:done")
        self.selected = out

    def _log(self, trainer, set_dir: Path, kept_dir: Path, scores: dict[str, float]) -> None:
        """The histogram of the scores, grids of the kept and the dropped anomalies, to every logger."""
        import torch

        kept_ids = {r["id"] for r in read_manifest(kept_dir) if r["label"] == 1}
        ranked = sorted(scores, key=lambda i: (-scores[i], i))  # best first, as select_top ranks them
        key, step = self.key, trainer.global_step
        figures = {f"quality/{key}_histogram": score_histogram(
            [scores[i] for i in ranked], [i in kept_ids for i in ranked],
            title=f"{key}: {len(kept_ids)} of {len(ranked)} anomalies kept (keep_fraction {self.keep_fraction:.3g})")}
        if self.max_images:
            anomalies = SyntheticSet(set_dir, image_size=trainer.datamodule.support[0]["image"].shape[-2:],
                                     labels=(1,))
            position = {sample_id: n for n, sample_id in enumerate(anomalies.ids)}
            kept = [i for i in ranked if i in kept_ids][: self.max_images]
            dropped = [i for i in reversed(ranked) if i not in kept_ids][: self.max_images]
            for name, ids in (("kept", kept), ("dropped", dropped)):
                if ids:
                    images = torch.stack([anomalies[position[i]]["image"].float() for i in ids])
                    figures[f"quality/{key}_{name}"] = image_grid(images.expand(-1, 3, -1, -1))
        numbers = {f"quality/{key}_kept": float(len(kept_ids)),
                   f"quality/{key}_min_kept": min(scores[i] for i in kept_ids)}
        if self.images_dir is not None:
            self.images_dir.mkdir(parents=True, exist_ok=True)
            for name, image in figures.items():
                save_png(image, self.images_dir / f"{name.replace('/', '_')}.png")
        for logger in trainer.loggers:
            logger.log_metrics(numbers, step=step)
            for name, image in figures.items():
                log_image(logger, name, image, step=step)
