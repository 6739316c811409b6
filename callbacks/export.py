"""Export what a LightningModule's ``predict_step`` generates as a synthetic set (see ``anomgen.data.synthetic``).

``predict_step`` returns a *generated batch*, a dict with:

- ``index``: LongTensor (B,), the global sample indices (the sample ids);
- ``image``: B × 3 × H × W in [0, 1]; ``mask``: B × H × W in {0, 1}, or ``None``;
- ``label``: LongTensor (B,), 1 for anomalies (0 for normals a generator passes through, e.g. held-out normals);
- ``generator``: str; ``category``, ``defect_type``: lists of str; ``sources``: list of lists of source ids;
- ``params``: list of dicts (JSON-serialisable parameters of each draw).

Each rank writes its shard as samples arrive (nothing piles up in memory); after a barrier rank 0 merges the shards
into the final set atomically, so an interrupted run leaves no set that looks whole. An existing set is refused at
the start of prediction, before any work, unless ``overwrite=True``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from anomgen.data.synthetic import SetWriter, format_id, merge_shards, shard_path
from anomgen.errors import SyntheticSetError

REQUIRED_KEYS = ("index", "image", "label", "generator", "category", "defect_type", "sources", "params")


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
        """Refuse an existing set (train.py calls this before fitting, so that no training is wasted)."""
        if self.dirpath.exists() and not self.overwrite:
            raise SyntheticSetError(
                f"synthetic set {self.dirpath} already exists; refusing to overwrite it. Choose another path or "
                "set overwrite=True (callbacks.synthetic_set_export.overwrite=true)."
            )

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check_target()
        if trainer.is_global_zero:  # shards of an interrupted run are never a set: safe to drop
            for stale in self.dirpath.parent.glob(f".{self.dirpath.name}.shard-*"):
                shutil.rmtree(stale)
        trainer.strategy.barrier("synthetic_set_export:start")
        self._writer = SetWriter(shard_path(self.dirpath, trainer.global_rank))

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if outputs is None:
            return
        missing = [k for k in REQUIRED_KEYS if k not in outputs]
        if missing:
            raise KeyError(f"{type(pl_module).__name__}.predict_step must return a generated batch; missing {missing}")
        masks = outputs.get("mask")
        for j, index in enumerate(torch.as_tensor(outputs["index"]).tolist()):
            self._writer.add(
                format_id(index),
                outputs["image"][j].detach().float().cpu(),
                mask=None if masks is None else masks[j].detach().cpu(),
                label=int(outputs["label"][j]),
                generator=outputs["generator"],
                category=outputs["category"][j],
                defect_type=outputs["defect_type"][j],
                sources=list(outputs["sources"][j]),
                params=outputs["params"][j],
            )

    def on_predict_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._writer.close()
        trainer.strategy.barrier("synthetic_set_export:written")
        if trainer.is_global_zero:
            shards = [shard_path(self.dirpath, rank) for rank in range(trainer.world_size)]
            info = {"checkpoint": trainer.ckpt_path, "world_size": trainer.world_size, **self.set_info}
            info.setdefault("generator", getattr(pl_module, "generator_name", type(pl_module).__name__))
            merge_shards(shards, self.dirpath, info, overwrite=self.overwrite)
        trainer.strategy.barrier("synthetic_set_export:merged")
        self.exported = self.dirpath
