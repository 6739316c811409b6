"""Log a grid of generated images, masks drawn over them, to whichever logger is set (and as a PNG in the run)."""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch import Callback

from anomgen.pixels import to_uint8
from anomgen.visualize import image_grid, overlay_mask, save_png


class LogGeneratedImages(Callback):
    def __init__(self, max_images: int = 16, dirpath: str | None = None, key: str = "predict/generated") -> None:
        self.max_images, self.key = max_images, key
        self.dirpath = None if dirpath is None else Path(dirpath)
        self._images: list[torch.Tensor] = []

    def on_predict_start(self, trainer, pl_module) -> None:
        self._images = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        have = sum(len(x) for x in self._images)
        if outputs is None or have >= self.max_images:
            return
        take = self.max_images - have
        images = outputs.image[:take].detach().float().cpu()  # a GeneratedBatch
        masks = outputs.mask
        self._images.append(overlay_mask(images, None if masks is None else masks[:take].detach().cpu()))

    def on_predict_end(self, trainer, pl_module) -> None:
        if not self._images or not trainer.is_global_zero:
            return
        grid = image_grid(torch.cat(self._images))
        if self.dirpath is not None:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            save_png(grid, self.dirpath / f"{self.key.replace('/', '_')}.png")
        for logger in trainer.loggers:
            log_image(logger, self.key, grid, step=trainer.global_step)


def log_image(logger, key: str, image: torch.Tensor, step: int = 0) -> None:
    """Send a 3 × H × W [0, 1] image to a Lightning logger, whatever its kind."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    if isinstance(logger, WandbLogger):  # as 8-bit: W&B stores a float array's values as they are (0 or 1: black)
        logger.log_image(key=key, images=[to_uint8(image).permute(1, 2, 0).numpy()], step=step)
    elif isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(key, image, global_step=step)
    # CSV and other loggers take no images: the PNG in the run directory is the record.
