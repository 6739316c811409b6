"""model=backbone_pretrain with datamodule=classification: the Lightning stage equals a hand-written training loop
(same permutations, augmentations, warm-up/cosine schedule, head initialisation), and writes its backbone output."""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn.functional as F

from anomgen.data.shipped import load_images, make_dataset
from anomgen.encoders.vit import build_vit, load_backbone
from anomgen.pixels import augment_batch
from datamodules.classification import ClassificationDataModule
from models.backbone_pretrain import BackbonePretraining

SIZES = {"patch_size": 8, "num_layers": 2, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32}


def reference_pretraining(epochs: int, batch_size: int, max_images: int, seed: int = 0) -> dict:
    """The recipe written out: AdamW, linear warm-up over one epoch then cosine per step, label smoothing 0.1,
    one seeded generator for the epoch permutations and the pad-crop-flip augmentation."""
    x, y, classes = load_images(make_dataset("digits"), (), max_images, seed)
    torch.manual_seed(seed)
    backbone = build_vit("vit_small", 32, None, **SIZES)
    torch.manual_seed(seed)
    head = torch.nn.Linear(backbone.feature_dim, len(classes))
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in backbone.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
    steps = math.ceil(len(x) / batch_size)
    total, warmup = epochs * steps, steps
    step = 0
    backbone.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            images = augment_batch(x[idx], 32, generator=generator, kind="pad_crop", padding=4, flip=True)
            loss = F.cross_entropy(head(backbone(images)), y[idx], label_smoothing=0.1)
            factor = (step + 1) / warmup if step < warmup else \
                0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
            for group in optimizer.param_groups:
                group["lr"] = 1e-3 * factor
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    return backbone.state_dict()


def test_stage_equals_the_written_out_recipe(tmp_path, one_thread):
    datamodule = ClassificationDataModule("digits", max_images=40, batch_size=16, image_size=32)
    model = BackbonePretraining("vit_small", 32, **SIZES)
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=datamodule)
    expected = reference_pretraining(epochs=2, batch_size=16, max_images=40)
    saved = load_backbone(model.stage_outputs["backbone"])
    for key, value in expected.items():
        torch.testing.assert_close(saved.state_dict()[key], value, rtol=1e-5, atol=1e-6, msg=key)
    info = saved.info
    assert info["dataset"] == "digits" and info["epochs"] == 2 and info["classes"] == [str(d) for d in range(10)]
    assert model.stage_outputs["backbone"] == str((tmp_path / "backbone.pt").resolve())


def test_pretraining_on_digits_beats_chance(tmp_path, one_thread):
    datamodule = ClassificationDataModule("digits", max_images=800, batch_size=32, image_size=8,
                                          augment={"kind": "pad_crop", "padding": 1, "flip": False})
    model = BackbonePretraining("vit_small", 8, lr=3e-3, weight_decay=0.0, label_smoothing=0.0, patch_size=2,
                                num_layers=2, num_heads=2, hidden_dim=48, mlp_dim=96)
    losses = []

    class Record(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            losses.append(float(trainer.callback_metrics["train/loss"]))

    trainer = L.Trainer(max_epochs=6, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[Record()])
    trainer.fit(model, datamodule=datamodule)
    assert float(trainer.callback_metrics["train/acc"]) > 0.2  # ten classes: chance is 0.1
    assert losses[-1] < losses[0]
    assert load_backbone(model.stage_outputs["backbone"]).info["classes"] == [str(d) for d in range(10)]


def test_classes_can_be_left_out_and_a_wrong_name_is_an_error():
    datamodule = ClassificationDataModule("digits", exclude_classes=["3", "5"], max_images=64)
    datamodule.setup("fit")
    assert "3" not in datamodule.classes and len(datamodule.classes) == 8
    assert set(datamodule.labels.tolist()) <= set(range(8))
    import pytest

    with pytest.raises(ValueError, match="not classes of digits"):
        ClassificationDataModule("digits", exclude_classes=["Dog"]).setup("fit")


def test_stage_from_the_command_line(compose_config, tmp_path):
    """``python train.py model=backbone_pretrain datamodule=classification ...``: the stage records its backbone."""
    import json

    from train import train

    cfg = compose_config("train", ["model=backbone_pretrain", "datamodule=classification", "callbacks=none",
                                   "datamodule.dataset=digits", "datamodule.max_images=32", "trainer.max_epochs=1",
                                   "trainer.enable_checkpointing=false", "logger=none", "model.image_size=8"],
                         run_dir=tmp_path / "run")
    train(cfg)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["outputs"]["backbone"] == str((tmp_path / "run" / "backbone.pt").resolve())
    assert load_backbone(record["outputs"]["backbone"]).info["epochs"] == 1


def test_ranks_share_an_epoch_instead_of_each_training_on_all_of_it():
    """The loader is an IterableDataset, which Lightning's distributed sampler does not split: before, every rank
    of a DDP run trained on the same batches (N times the work for one epoch's worth of gradient)."""
    from datamodules.classification import EpochBatches

    n = 21
    images, labels = torch.rand(n, 3, 8, 8), torch.arange(n)
    kw = {"batch_size": 4, "image_size": 8, "augment": {"kind": "pad_crop", "padding": 1, "flip": True}, "seed": 0}
    shards = [EpochBatches(images, labels, rank=r, world_size=2, **kw) for r in (0, 1)]
    for _ in range(2):  # two epochs: a fresh permutation each, the same on both ranks
        seen = [[b["label"] for b in shard] for shard in shards]
        assert [len(s) for s in seen] == [len(shard) for shard in shards] == [3, 3]  # 11 images a rank
        labels0, labels1 = torch.cat(seen[0]), torch.cat(seen[1])
        assert len(labels0) == len(labels1) == 11
        assert set(labels0.tolist()) | set(labels1.tolist()) == set(range(n))  # the epoch, shared
        assert len(set(labels0.tolist()) & set(labels1.tolist())) == 1  # only the padding image twice
    alone = EpochBatches(images, labels, **kw)
    assert len(alone) == 6 and sorted(torch.cat([b["label"] for b in alone]).tolist()) == list(range(n))
