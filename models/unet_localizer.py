"""``model=unet_localizer``: AnomalyDiffusion's localizer, DRAEM's discriminative sub-network trained on image–mask
pairs (thin wrapper over :mod:`anomgen.detectors.localizer`).

Data come from :class:`datamodules.LocalizerDataModule` (``experiment=localizer_mvtec`` sets it): half real normals
with empty masks, half anomalous pairs (Perlin, or a synthetic set with masks). Loss: DRAEM's focal loss (γ 2) on
the softmax of the two logits. Optimiser and schedule (METHODS.md §4): Adam 1e-4, the learning rate × 0.2 at 80% and
90% of ``trainer.max_epochs`` (``milestones``; per step of ``estimated_stepping_batches`` when training is set in
steps).

**Checkpoint selection.** After every validation epoch (held-out normals + held-out *generated* pairs, never the test
split) the pixel metrics of p_anomalous are computed (binned over [0, 1], synced across processes) and logged as
``val/pixel_AUROC``, ``val/pixel_AP`` (and ``val/image_AUROC``, ``val/image_AP`` of the image score), with a grid
of ``log_maps`` held-out examples (anomalous pairs first), one row each: the image, its true mask tinted red, the
predicted map (``val/predicted_maps``, an image for W&B and TensorBoard); whenever
``val/<monitor>`` (default ``pixel_AP``) improves, rank 0 writes the network to ``weights_path`` (default
``<run dir>/localizer.pt``) with :func:`~anomgen.detectors.localizer.save_localizer`. That file is the stage's
``checkpoint`` output, which ``detector=unet_localizer`` reads. The AnomalyDiffusion paper (and its code) picked the
localizer's checkpoint on the test set; its figures are therefore optimistic next to these. Without validation (or
when the monitored metric is never defined) the last weights are written at the end of fitting, and the file says so.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from lightning.pytorch import LightningModule

from anomgen.detectors.localizer import (
    SCORE_KERNEL,
    WEIGHTS_NAME,
    DiscriminativeSubNetwork,
    anomaly_map,
    focal_loss,
    image_scores,
    save_localizer,
)
from anomgen.errors import ConfigError
from anomgen.files import to_json
from anomgen.metrics import anomaly_metrics

MONITORS = ("pixel_AP", "pixel_AUROC", "image_AP", "image_AUROC")
PAPER_NOTE = ("the AnomalyDiffusion paper and code pick the localizer's checkpoint on the test set; this one was "
              "picked on held-out generated pairs and held-out normals")


def lr_milestones(fractions, total: int) -> list[int]:
    """The epochs (or steps) at which the learning rate drops: ``floor(f · total)`` for each fraction, at least 1 (a
    milestone at 0 would drop it before training starts)."""
    return [max(1, math.floor(float(f) * int(total) + 1e-9)) for f in fractions]


class UNetLocalizerModel(LightningModule):
    trainable = True  # train.py runs Trainer.fit
    generates = False  # the product is the weights file

    def __init__(
        self,
        optimizer,
        scheduler=None,
        milestones=(0.8, 0.9),
        base_width: int = 64,
        gamma: float = 2.0,
        smooth: float = 1e-5,
        monitor: str = "pixel_AP",
        num_thresholds: int = 1000,
        score_kernel: int = SCORE_KERNEL,
        weights_path: str | None = None,
        log_maps: int = 8,
    ) -> None:
        super().__init__()
        if monitor not in MONITORS:
            raise ConfigError(f"model.monitor must be one of {MONITORS}, got {monitor!r}")
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.network = DiscriminativeSubNetwork(3, 2, base_width)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.milestones = [float(f) for f in milestones]
        self.gamma, self.smooth = float(gamma), float(smooth)
        self.monitor = monitor
        self.score_kernel = int(score_kernel)
        self.weights_path = weights_path
        self.log_maps = int(log_maps)
        self._map_examples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = []
        self.pixel_metrics = anomaly_metrics(("AUROC", "AP"), prefix="pixel_", num_thresholds=num_thresholds,
                                             score_range=(0.0, 1.0))
        self.image_metrics = anomaly_metrics(("AUROC", "AP"), prefix="image_")
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.image_size: list[int] | None = None
        self.saved_path: Path | None = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits B × 2 × H × W of [0, 1] images."""
        return self.network(images)

    # -- training --------------------------------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        self.image_size = list(images.shape[-2:])
        loss = focal_loss(self(images), batch["mask"], self.gamma, self.smooth)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the focal loss is {loss.item()} at step {self.global_step}")
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        return loss

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        epochs = self.trainer.max_epochs
        if epochs is not None and epochs > 0:
            total, interval = epochs, "epoch"
        else:  # training set in steps
            total, interval = int(self.trainer.estimated_stepping_batches), "step"
        scheduler = self.scheduler_factory(optimizer, milestones=lr_milestones(self.milestones, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}

    # -- validation: checkpoint selection on held-out generated pairs ----------------------------------------------
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        images, masks = batch["image"], batch["mask"]
        logits = self(images)
        self.log("val/loss", focal_loss(logits, masks, self.gamma, self.smooth), batch_size=len(images))
        maps = anomaly_map(logits).clamp(0.0, 1.0)
        self.pixel_metrics.update(maps, masks)
        self.image_metrics.update(image_scores(maps, self.score_kernel), batch["label"])
        if self.log_maps and not self.trainer.sanity_checking:
            for i in range(len(images)):  # anomalous pairs first, then normals, up to log_maps
                self._map_examples.append((images[i].detach().cpu(), masks[i].detach().cpu(),
                                           maps[i].detach().float().cpu(), int(batch["label"][i])))
            self._map_examples.sort(key=lambda e: -e[3])
            del self._map_examples[self.log_maps:]

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:  # a couple of batches, often normals only: nothing to select on
            self.pixel_metrics.reset()
            self.image_metrics.reset()
            return
        values = {k: float(v) for k, v in {**self.pixel_metrics.compute(), **self.image_metrics.compute()}.items()}
        self.pixel_metrics.reset()
        self.image_metrics.reset()
        for key, value in values.items():
            self.log(f"val/{key}", value)
        self._log_maps()
        value = values[self.monitor]
        if math.isfinite(value) and (self.best_value is None or value > self.best_value):
            self.best_value, self.best_epoch = value, int(self.current_epoch)
            self._save(f"best val/{self.monitor} over the validation epochs", values)

    def _log_maps(self) -> None:
        """``val/predicted_maps``: one row per kept example: image, true mask tinted red, predicted map."""
        from anomgen.visualize import image_grid, overlay_mask
        from callbacks.image_log import log_image

        examples, self._map_examples = self._map_examples, []
        if not examples or not self.trainer.is_global_zero:
            return
        tiles = []
        for image, mask, prob, _ in examples:
            image = image.float().clamp(0, 1)
            prob = torch.nn.functional.interpolate(prob[None, None], size=image.shape[-2:], mode="bilinear")[0]
            tiles += [image, overlay_mask(image[None], mask[None])[0], prob.expand(3, -1, -1).clamp(0, 1)]
        grid = image_grid(torch.stack(tiles), nrow=3)
        for logger in self.loggers:
            log_image(logger, "val/predicted_maps", grid, step=self.global_step)

    # -- the product: the weights file -------------------------------------------------------------------------------
    def output_path(self) -> Path:
        if self.weights_path:
            return Path(self.weights_path)
        return Path(self.trainer.default_root_dir) / WEIGHTS_NAME

    def _save(self, selected: str, values: dict | None = None) -> None:
        if not self.trainer.is_global_zero:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        describe = getattr(datamodule, "describe_pairs", None)
        info = {
            "stage": "unet_localizer",
            "image_size": self.image_size,
            "epoch": int(self.current_epoch),
            "global_step": int(self.global_step),
            "selected": selected,
            "monitor": f"val/{self.monitor}",
            "value": self.best_value,
            "val_metrics": values or {},
            "data": describe() if callable(describe) else None,
            "note": PAPER_NOTE,
            "recipe": {"base_width": self.network.config["base_width"], "gamma": self.gamma, "smooth": self.smooth,
                       "milestones": self.milestones, "score_kernel": self.score_kernel},
        }
        self.saved_path = save_localizer(self.network, self.output_path(), to_json(info))

    def on_fit_end(self) -> None:
        if self.best_value is None or self.saved_path is None and not self.output_path().is_file():
            self._save("last weights (no validation, or the monitored metric was never defined)")
        self.trainer.strategy.barrier("unet_localizer_saved")  # every rank may read the file afterwards
        self.stage_outputs = {"checkpoint": str(self.output_path().resolve())}  # recorded in run.json

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["unet_localizer"] = {"best_value": self.best_value, "best_epoch": self.best_epoch,
                                        "image_size": self.image_size}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("unet_localizer") or {}
        self.best_value, self.best_epoch = state.get("best_value"), state.get("best_epoch")
        self.image_size = state.get("image_size")
