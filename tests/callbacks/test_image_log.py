"""Generated images reach the logger as a grid with the masks drawn over them."""

from __future__ import annotations

import functools

import numpy as np
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import WandbLogger
from PIL import Image

from anomgen.visualize import image_grid, overlay_mask
from callbacks import LogGeneratedImages
from datamodules import AnomalyDataModule
from models.noise_patch import NoisePatchModel


def test_overlay_tints_only_masked_pixels():
    images = torch.full((2, 3, 4, 4), 0.5)
    masks = torch.zeros(2, 4, 4)
    masks[0, 1, 1] = 1
    out = overlay_mask(images, masks, color=(1.0, 0.0, 0.0), alpha=0.5)
    assert torch.allclose(out[0, :, 1, 1], torch.tensor([0.75, 0.25, 0.25]))
    untouched = torch.ones(2, 4, 4, dtype=torch.bool)
    untouched[0, 1, 1] = False
    assert torch.equal(out.permute(1, 0, 2, 3)[:, untouched], images.permute(1, 0, 2, 3)[:, untouched])


def test_image_grid_places_images_row_major():
    images = torch.stack([torch.full((3, 2, 2), v) for v in (0.1, 0.2, 0.3)])
    grid = image_grid(images, nrow=2, padding=1, pad_value=1.0, min_tile=1)
    assert grid.shape == (3, 2 * 3 + 1, 2 * 3 + 1)
    assert torch.allclose(grid[:, 1:3, 1:3], torch.tensor(0.1)) and torch.allclose(grid[:, 1:3, 4:6], torch.tensor(0.2))
    assert torch.allclose(grid[:, 4:6, 1:3], torch.tensor(0.3)) and torch.allclose(grid[:, 4:6, 4:6], torch.tensor(1.0))


def test_small_images_are_enlarged_by_nearest_neighbour_in_a_grid():
    """8×8 digits made a grid ~40 px wide: each tile is now at least 64 px a side, every source pixel a constant
    block (nearest neighbour, no blur); large images stay as they are."""
    images = torch.rand(4, 3, 8, 8)
    grid = image_grid(images, nrow=2, padding=2)
    assert grid.shape == (3, 2 * 66 + 2, 2 * 66 + 2)
    for i in range(4):
        r, col = divmod(i, 2)
        tile = grid[:, 2 + r * 66 : 2 + r * 66 + 64, 2 + col * 66 : 2 + col * 66 + 64]
        blocks = tile.reshape(3, 8, 8, 8, 8)  # (channel, source row, block row, source column, block column)
        assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks))
        assert torch.equal(blocks[:, :, 0, :, 0], images[i])
    assert image_grid(torch.rand(2, 3, 30, 20)).shape == (3, 30 * 4 + 2 * 2, 2 * (20 * 4 + 2) + 2)  # ×4: 80 × 120
    big = torch.rand(1, 3, 64, 96)
    assert torch.equal(image_grid(big, padding=0), big[0])


def test_callback_logs_a_grid_to_wandb_offline_and_saves_png(tmp_path):
    from anomgen.data import Digits

    dm = AnomalyDataModule(dataset=functools.partial(Digits), normal_class="3", num_generated=6, eval_batch_size=4)
    logger = WandbLogger(project="anomgen-test", save_dir=str(tmp_path), offline=True)
    callback = LogGeneratedImages(max_images=5, dirpath=str(tmp_path / "images"))
    trainer = Trainer(accelerator="cpu", devices=1, logger=logger, callbacks=[callback], enable_progress_bar=False)
    trainer.predict(NoisePatchModel(), datamodule=dm, return_predictions=False)
    import wandb

    wandb.finish()
    png = np.asarray(Image.open(tmp_path / "images" / "predict_generated.png"))
    assert png.shape == (2 * 66 + 2, 3 * 66 + 2, 3)  # 5 images of 8×8 at 64 px -> 3 columns, 2 rows, 2 px padding
    tiles = [png[2 + r * 66 : 2 + r * 66 + 64, 2 + c * 66 : 2 + c * 66 + 64] for r in range(2) for c in range(3)][:5]
    for tile in tiles:  # nearest neighbour: each of the 8×8 source pixels is a constant 8×8 block
        blocks = tile.reshape(8, 8, 8, 8, 3)
        assert (blocks == blocks[:, :1, :, :1]).all()
    red_tint = (png[..., 0].astype(int) - png[..., 1].astype(int)) > 40
    assert red_tint.any(), "the masks must be visible on the grid"
    media = list(tmp_path.glob("wandb/offline-run-*/files/media/images/**/*.png"))
    assert media, "the grid must be logged to W&B (offline)"
    assert np.array_equal(np.asarray(Image.open(media[0]).convert("RGB")), png), "W&B gets the same enlarged 8-bit grid"
