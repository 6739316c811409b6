"""``model=backbone_pretrain``: supervised pretraining of a ViT backbone on a dataset disjoint from the task.

FITYMI fine-tunes a *pretrained* ViT with outlier exposure; offline there is no ImageNet ViT, so the small ViT is
pretrained by classification over the classes of the other shipped dataset (``datamodule=classification``) through a
temporary linear head, which is dropped. AdamW with a linear warm-up then cosine decay per step, cross-entropy with
label smoothing. At the end of fitting rank 0 writes the backbone (no head) to ``<run dir>/backbone.pt``: the stage's
``backbone`` output, which ``model=vit_oe``'s ``backbone.pretrained`` and ``detector=knn_backbone`` read.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import nn

from anomgen.encoders.vit import build_vit, save_backbone


def warmup_cosine(warmup: int, total: int):
    """The learning-rate factor of step ``s``: linear warm-up over ``warmup`` steps, then a cosine to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


class BackbonePretraining(LightningModule):
    trainable = True
    generates = False

    def __init__(self, arch: str = "vit_small", image_size: int = 32, lr: float = 1e-3, weight_decay: float = 0.05,
                 warmup_epochs: float = 1.0, label_smoothing: float = 0.1, init: str | None = None, seed: int = 0,
                 **sizes) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)  # the same backbone for the same seed, whatever ran before
        self.backbone = build_vit(arch, image_size, init, **sizes)
        self.head: nn.Linear | None = None  # sized from the datamodule's classes in setup("fit")
        self.stage_outputs: dict = {}

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.head is None:
            classes = self.trainer.datamodule.classes if self.trainer.datamodule.classes else None
            if classes is None:
                self.trainer.datamodule.setup("fit")
                classes = self.trainer.datamodule.classes
            torch.manual_seed(self.hparams.seed)
            self.head = nn.Linear(self.backbone.feature_dim, len(classes))
            self.classes = list(classes)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        logits = self.head(self.backbone(batch["image"]))
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.hparams.label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"pretraining loss is {loss.item()} at step {self.global_step}; lower model.lr")
        n = len(batch["label"])
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=n)
        self.log("train/acc", (logits.argmax(1) == batch["label"]).float().mean(), prog_bar=True, on_step=False,
                 on_epoch=True, batch_size=n)
        return loss

    def configure_optimizers(self):
        params = [p for p in self.backbone.parameters() if p.requires_grad] + list(self.head.parameters())
        optimizer = torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        steps_per_epoch = len(self.trainer.datamodule.train_dataloader().dataset)
        total = self.trainer.max_epochs * steps_per_epoch
        warmup = max(1, int(self.hparams.warmup_epochs * steps_per_epoch))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_fit_end(self) -> None:
        if self.trainer.is_global_zero:
            data = self.trainer.datamodule.describe()
            metrics = self.trainer.callback_metrics
            info = {"stage": "pretrain", **data, "init": self.hparams.init, "epochs": int(self.trainer.max_epochs),
                    "lr": self.hparams.lr, "weight_decay": self.hparams.weight_decay,
                    "final_train_loss": float(metrics["train/loss"]) if "train/loss" in metrics else None,
                    "final_train_acc": float(metrics["train/acc"]) if "train/acc" in metrics else None,
                    "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            path = save_backbone(self.backbone.eval(), Path(self.trainer.default_root_dir) / "backbone.pt", info)
            self.stage_outputs = {"backbone": str(path.resolve())}
        self.trainer.strategy.barrier("backbone_pretrain_saved")
