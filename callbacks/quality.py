"""Score the exported synthetic set with a quality scorer (EAP by default) and keep the best part as a new set.

Runs after :class:`~callbacks.export.SyntheticSetExport` (list it after that callback), on rank 0: the scores go into
the set's manifest (``scores[key]``) and ``<set>_<key>_top`` holds the normals and the ``keep_fraction`` best
anomalies. The algorithm lives in :mod:`anomgen.quality.set_scoring`.
"""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback
from torch import nn
from torch.utils.data import Dataset

from anomgen.quality.set_scoring import score_set, select_top
from callbacks.export import SyntheticSetExport


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
    ) -> None:
        self.scorer, self.extractor, self.labelled_anomalies = scorer, extractor, labelled_anomalies
        self.key, self.keep_fraction = key, keep_fraction
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.overwrite = overwrite
        self.selected: Path | None = None

    @property
    def stage_outputs(self) -> dict:
        """What the run records (``run.json``): the kept set, as ``synthetic_set_<key>_top``."""
        return {} if self.selected is None else {f"synthetic_set_{self.key}_top": str(self.selected.resolve())}

    def on_predict_end(self, trainer, pl_module) -> None:
        export = next((c for c in trainer.callbacks if isinstance(c, SyntheticSetExport)), None)
        if export is None or export.exported is None:
            raise RuntimeError("QualityFilter needs a SyntheticSetExport callback listed before it (the set is "
                               "scored once it has been exported)")
        out = self.dirpath or export.dirpath.with_name(f"{export.dirpath.name}_{self.key}_top")
        if trainer.is_global_zero:
            score_set(export.dirpath, self.scorer, self.extractor, trainer.datamodule.support,
                      self.labelled_anomalies, key=self.key)
            select_top(export.dirpath, out, self.key, self.keep_fraction, overwrite=self.overwrite)
        trainer.strategy.barrier("quality_filter:done")
        self.selected = out
