"""``model=vit_oe``: FITYMI's outlier-exposure fine-tuning of a pretrained ViT (thin wrapper).

Training data come from the datamodule with ``outlier_exposure_set=<synthetic set>``: support normals (label 0) and
the set's anomalies (label 1), each with a float ``target``. The head is either

- ``"binary"``: 2 logits (normal 0, fake 1), cross-entropy on ``label`` (FITYMI), logging ``train/loss``,
  ``train/acc``; or
- ``"regression"``: 1 output, MSE on ``target`` (e.g. the edit strength α of the manifest, with
  ``datamodule.outlier_exposure_target=alpha``), logging ``train/loss`` and ``train/mae``.

The stem and the first ``freeze_blocks`` transformer blocks are frozen and left out of the optimizer, so they stay
bit-identical. Images are augmented on the batch (``augment``: FITYMI's resize-crop-flip for 224 px, pad-crop-flip
for the small shipped images; see :func:`anomgen.pixels.augment_batch`). The crops and flips come from a generator
seeded with ``seed + global_rank`` and the global generators (dropout) are reseeded the same way when fitting starts,
so that under DDP each rank augments its own way (:mod:`anomgen.distributed`).

Pretrained weights are loaded when fitting starts (``setup("fit")``), not at construction, so that the config
instantiates offline; a missing file fails then, with a message naming it and how to make it. At the end of fitting
rank 0 writes the backbone without its head to ``backbone_path`` (default ``<trainer.default_root_dir>/backbone.pt``)
with :func:`~anomgen.encoders.vit.save_backbone`; ``detector=knn_backbone`` scores with it (kNN over the CLS
features of the normal training images, sum of squared distances to the k = 2 nearest).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

from anomgen.distributed import rank_generator, seed_process
from anomgen.encoders.vit import build_vit, load_pretrained, save_backbone
from anomgen.errors import ConfigError
from anomgen.pixels import augment_batch

HEADS = ("binary", "regression")
#: the figures of the one line that ends fitting ("OE: 30 epochs, train loss 0.21, val acc 0.85"), when logged
SUMMARY = (("train/loss", "train loss"), ("train/acc", "train acc"), ("train/mae", "train mae"),
           ("val/loss", "val loss"), ("val/acc", "val acc"), ("val/mae", "val mae"))
log = logging.getLogger(__name__)


class ViTOE(LightningModule):
    trainable = True  # train.py runs Trainer.fit
    generates = False  # nothing to export: the product is the backbone file

    def __init__(
        self,
        backbone: dict,
        optimizer,
        head: str = "binary",
        freeze_blocks: int = 6,
        augment: dict | None = None,
        backbone_path: str | None = None,
        pretrained_on: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ConfigError(f"model.head must be one of {HEADS}, got {head!r}")
        self.save_hyperparameters(ignore=["optimizer"])
        config = dict(backbone)
        self.pretrained = config.pop("pretrained", None)
        self.backbone = build_vit(**config)  # architecture only; the weights come in setup("fit")
        self.backbone.freeze_blocks(freeze_blocks)
        self.head = nn.Linear(self.backbone.feature_dim, 2 if head == "binary" else 1)
        self.head_kind = head
        self.optimizer_factory = optimizer
        self.augment = None if augment is None else dict(augment)
        self.backbone_path = backbone_path
        self.pretrained_on = pretrained_on
        self._weights_loaded = self.pretrained is None
        self.seed = seed
        self._augment_generator: torch.Generator | None = None  # this rank's crops and flips (on_fit_start)

    # -- weights ---------------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and not self._weights_loaded:
            load_pretrained(self.backbone, self.pretrained)  # strict; a resumed checkpoint overwrites it afterwards
            self._weights_loaded = True
            self._check_pretraining_data()
        elif stage == "fit" and self.pretrained is None:
            warnings.warn("model.backbone.pretrained is null: outlier exposure starts from a random backbone, which "
                          "FITYMI does not do (OE from scratch damages the embedding)", stacklevel=2)

    def _check_pretraining_data(self) -> None:
        """Warn when the backbone was pretrained on the task's own dataset (its out-classes may have been seen)."""
        info = getattr(self.backbone, "info", {}) or {}
        seen = info.get("dataset")
        if self.pretrained_on is not None and seen is not None and seen != self.pretrained_on:
            warnings.warn(f"model.pretrained_on={self.pretrained_on!r} but {self.pretrained} was pretrained on "
                          f"{seen!r}", stacklevel=2)
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        factory = getattr(datamodule, "dataset_factory", None)
        task_dataset = getattr(getattr(factory, "func", factory), "name", None)
        if seen is not None and task_dataset == seen:
            classes = set(info.get("classes") or [])
            normal = getattr(datamodule, "normal_class", None)
            if getattr(datamodule, "protocol", None) == "one_vs_rest" or normal in classes:
                warnings.warn(f"the backbone {self.pretrained} was pretrained on {seen!r} classes {sorted(classes)}, "
                              f"the task's own dataset: the task's out-classes must not be among them; pretrain on the "
                              f"other shipped dataset instead", stacklevel=2)

    # -- training --------------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Head outputs (B × 2 logits, or B regression values) for [0, 1] images."""
        out = self.head(self.backbone(images))
        return out if self.head_kind == "binary" else out.squeeze(-1)

    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        if self.augment is None:
            return images
        return augment_batch(images, self.backbone.image_size, generator=self._augment_generator, **self.augment)

    def _step(self, batch: dict, stage: str, augment: bool) -> torch.Tensor:
        images = self._augment(batch["image"]) if augment else batch["image"]
        out = self(images)
        labels = batch["label"].long()
        n = len(images)
        if self.head_kind == "binary":
            loss = F.cross_entropy(out, labels)
            self.log(f"{stage}/acc", (out.argmax(1) == labels).float().mean(), prog_bar=True, batch_size=n)
        else:
            target = batch["target"].float() if "target" in batch else labels.float()
            loss = F.mse_loss(out, target)
            self.log(f"{stage}/mae", (out - target).abs().mean(), batch_size=n)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the {stage} loss is {loss.item()} at step {self.global_step}; "
                                     "lower the learning rate")
        self.log(f"{stage}/loss", loss, prog_bar=True, batch_size=n)
        return loss

    def on_fit_start(self) -> None:
        """Per-rank training randomness: crops and flips from this rank's generator (``seed + global_rank``, on the
        CPU, where :func:`~anomgen.pixels.augment_batch` draws them), and the global generators reseeded the same way,
        because dropout masks come from them and ``seed_everything`` gave every rank the same state."""
        self._augment_generator = rank_generator(self.seed, self.global_rank)
        seed_process(self.seed, self.global_rank)

    def on_train_epoch_start(self) -> None:
        # frozen blocks in eval mode too (they hold no dropout or batch statistics by default, but a config may add
        # dropout: frozen means frozen)
        for block in list(self.backbone.blocks)[: self.backbone.frozen_blocks]:
            block.eval()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train", augment=True)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val", augment=False)

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        return self.optimizer_factory(params=params)

    # -- the product: the backbone file ------------------------------------------------------------------------------
    def output_path(self) -> Path:
        if self.backbone_path:
            return Path(self.backbone_path)
        return Path(self.trainer.default_root_dir) / "backbone.pt"

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero:
            self._save_backbone()
        self.trainer.strategy.barrier("vit_oe_backbone_saved")  # every rank may read the file afterwards

    def _save_backbone(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        info = {
            "stage": "outlier_exposure",
            "head": self.head_kind,
            "freeze_blocks": self.backbone.frozen_blocks,
            "pretrained": None if self.pretrained is None else str(self.pretrained),
            "pretrained_info": dict(getattr(self.backbone, "info", {}) or {}),
            "global_step": int(self.global_step),
            "epochs": int(self.current_epoch),
            "outlier_exposure_set": getattr(datamodule, "outlier_exposure_set", None),
            "outlier_exposure_target": getattr(datamodule, "outlier_exposure_target", None),
            "normal_class": getattr(datamodule, "normal_class", None),
        }
        self.saved_backbone_path = save_backbone(self.backbone, self.output_path(), info)
        self.stage_outputs = {"backbone": str(Path(self.saved_backbone_path).resolve())}  # recorded in run.json
        found = self.trainer.callback_metrics
        figures = [f"{label} {float(found[key]):.3f}" for key, label in SUMMARY if key in found]
        epochs, steps = int(self.current_epoch), int(self.global_step)
        log.info("OE: %d epoch%s, %s; backbone saved to %s", epochs, "" if epochs == 1 else "s",
                 ", ".join([f"{steps} step{'' if steps == 1 else 's'}", *figures]), self.saved_backbone_path)
