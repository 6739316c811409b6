"""Export what a LightningModule's ``predict_step`` generates as a synthetic set (see ``anomgen.data.synthetic``).

``predict_step`` returns a :class:`~anomgen.data.generation.GeneratedBatch` (global indices, images in [0, 1], masks or
None, labels, generator, categories, defect types, sources, params; it checks itself when built). Anything else,
a dict in particular, is a :class:`TypeError` naming the model class.

Each rank writes its shard as samples arrive (nothing piles up in memory); after a barrier rank 0 merges the shards
into the final set atomically, so an interrupted run leaves no set that looks whole. An existing set is refused by
:meth:`SyntheticSetExport.check_target` (train.py calls it before fitting; prediction calls it again at its start)
unless ``overwrite=True``; what interrupted runs left beside the set (shards, temporary builds) is then removed.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

from anomgen.data.generation import GeneratedBatch
from anomgen.data.synthetic import SetWriter, check_target, merge_shards, read_manifest, remove_leftovers, shard_path

log = logging.getLogger(__name__)


class SyntheticSetExport(Callback):
    def __init__(self, dirpath: str, overwrite: bool = False, set_info: dict | None = None) -> None:
        self.dirpath = Path(dirpath)
        self.overwrite = overwrite
        self.set_info = dict(set_info or {})
        self._writer: SetWriter | None = None
        self.exported: Path | None = None

    @property
    def stage_outputs(self) -> dict:
        """What the run records (``run.json``): the exported set."""
        return {} if self.exported is None else {"synthetic_set": str(self.exported.resolve())}

    def check_target(self) -> None:
        """Whether the set may be written (:func:`anomgen.data.synthetic.check_target`, the check the merge makes):
        train.py calls this before fitting, so that no training is wasted on a set that would be refused."""
        check_target(self.dirpath, self.overwrite,
                     how="overwrite=True (callbacks.synthetic_set_export.overwrite=true on the command line)")

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check_target()
        if trainer.is_global_zero:  # shards and temporary builds of an interrupted run are never a set
            remove_leftovers(self.dirpath)
        trainer.strategy.barrier("synthetic_set_export:start")
        self._writer = SetWriter(shard_path(self.dirpath, trainer.global_rank))

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if outputs is None:
            return
        if not isinstance(outputs, GeneratedBatch):
            raise TypeError(f"{type(pl_module).__name__}.predict_step must return an "
                            f"anomgen.data.generation.GeneratedBatch, got {type(outputs).__name__}")
        self._writer.add_batch(outputs)

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._writer.close()
        trainer.strategy.barrier("synthetic_set_export:written")
        if trainer.is_global_zero:
            shards = [shard_path(self.dirpath, rank) for rank in range(trainer.world_size)]
            # the model may add what it alone knows (e.g. the split of a validation set: ``set_info``)
            info = {"checkpoint": trainer.ckpt_path, "world_size": trainer.world_size,
                    **(getattr(pl_module, "set_info", None) or {}), **self.set_info}
            info.setdefault("generator", getattr(pl_module, "generator_name", type(pl_module).__name__))
            merge_shards(shards, self.dirpath, info, overwrite=self.overwrite)
            log.info("exported %d samples to %s", len(read_manifest(self.dirpath)), self.dirpath)
        trainer.strategy.barrier("synthetic_set_export:merged")
        self.exported = self.dirpath
