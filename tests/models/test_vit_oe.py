"""model=vit_oe: outlier-exposure fine-tuning of a pretrained ViT (binary and regression heads), frozen blocks stay
bit-identical, the backbone file written at fit end feeds detector=knn_backbone, and the configs compose."""

from __future__ import annotations

import functools

import hydra
import pytest
import torch
from lightning.pytorch import Callback, Trainer

from anomgen.data import Digits
from anomgen.data.synthetic import write_set
from anomgen.encoders import BackboneFeatures, build_vit
from anomgen.encoders.vit import save_backbone
from anomgen.errors import PretrainedNotFoundError
from datamodules import AnomalyDataModule
from models.vit_oe import ViTOE

TINY = {"arch": "vit_small", "image_size": 16, "patch_size": 4, "num_layers": 3, "num_heads": 2, "hidden_dim": 32,
        "mlp_dim": 64}


@pytest.fixture(scope="module")
def noise_set(tmp_path_factory):
    """A tiny synthetic set: 40 uniform-noise 'anomalies' of digit size, each with an edit strength alpha."""
    out = tmp_path_factory.mktemp("oe") / "noise_set"
    g = torch.Generator().manual_seed(0)
    samples = [{"image": torch.rand(3, 8, 8, generator=g), "label": 1, "generator": "noise", "category": "3",
                "params": {"alpha": 0.25 + 0.5 * (i % 4) / 3}} for i in range(40)]
    return write_set(out, samples, {"generator": "noise", "config": {}, "checkpoint": None, "task": {}})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A 'pretrained' backbone file (random weights are enough to test the plumbing)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pre") / "vit_small_animal_mnist.pt"
    return save_backbone(build_vit(**TINY), path, {"stage": "pretrain", "dataset": "animal_mnist"})


def _model(pretrained, head="binary", lr=0.05, freeze_blocks=2, **kw):
    return ViTOE(backbone={**TINY, "pretrained": str(pretrained)}, head=head, freeze_blocks=freeze_blocks,
                 optimizer=functools.partial(torch.optim.SGD, lr=lr, momentum=0.9), pretrained_on="animal_mnist",
                 augment={"kind": "pad_crop", "padding": 1, "flip": True}, **kw)


def _datamodule(noise_set, target=None):
    return AnomalyDataModule(dataset=functools.partial(Digits), normal_class="3", batch_size=16, validation="none",
                             outlier_exposure_set=str(noise_set), outlier_exposure_target=target)


class Losses(Callback):
    def __init__(self):
        self.values = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.values.append(float(outputs["loss"]))


def _fit(model, datamodule, root, steps=30):
    losses = Losses()
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[losses],
                      default_root_dir=str(root))
    trainer.fit(model, datamodule=datamodule)
    return trainer, losses.values


def test_binary_head_trains_frozen_blocks_stay_and_backbone_is_saved(tmp_path, noise_set, pretrained):
    torch.manual_seed(0)
    model = _model(pretrained)
    start = {k: v.clone() for k, v in model.backbone.state_dict().items()}  # random until fit loads the weights
    trainer, losses = _fit(model, _datamodule(noise_set), tmp_path)
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert {"train/loss", "train/acc"} <= set(trainer.callback_metrics)
    loaded = torch.load(pretrained, weights_only=True)["state_dict"]
    after = model.backbone.state_dict()
    frozen = {n for n, p in model.backbone.named_parameters() if not p.requires_grad}
    assert frozen and any("encoder_layer_1." in n for n in frozen) and not any("encoder_layer_2." in n for n in frozen)
    for name in after:
        if name in frozen:  # the pretrained values, bit for bit
            assert torch.equal(after[name], loaded[name]), name
        else:
            assert not torch.equal(after[name], loaded[name]), f"{name} did not train"
    assert not all(torch.equal(start[k], after[k]) for k in start)  # the pretrained weights were loaded at fit
    # the backbone file (no head) reloads strictly and gives identical features
    path = tmp_path / "backbone.pt"
    assert path.is_file()
    payload = torch.load(path, weights_only=True)
    assert not any(k.startswith("head") for k in payload["state_dict"])
    assert payload["info"]["stage"] == "outlier_exposure" and payload["info"]["outlier_exposure_set"] == str(noise_set)
    assert payload["info"]["pretrained_info"]["dataset"] == "animal_mnist"
    images = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(BackboneFeatures(str(path), device="cpu")(images), model.backbone.eval()(images))


def test_regression_head_trains_on_a_manifest_param(tmp_path, noise_set, pretrained):
    torch.manual_seed(0)
    model = _model(pretrained, head="regression", lr=0.02, backbone_path=str(tmp_path / "elsewhere" / "b.pt"))
    trainer, losses = _fit(model, _datamodule(noise_set, target="alpha"), tmp_path, steps=30)
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    assert {"train/loss", "train/mae"} <= set(trainer.callback_metrics)
    assert (tmp_path / "elsewhere" / "b.pt").is_file() and not (tmp_path / "backbone.pt").exists()
    datamodule = _datamodule(noise_set, target="alpha")
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert {round(float(t), 4) for t in batch["target"]} <= {0.0, 0.25, 0.4167, 0.5833, 0.75}
    assert model(batch["image"]).shape == (len(batch["image"]),)


def test_missing_pretrained_backbone_fails_at_fit_naming_it(tmp_path, noise_set):
    model = ViTOE(backbone={**TINY, "pretrained": str(tmp_path / "backbones" / "vit_small_digits.pt")},
                  optimizer=functools.partial(torch.optim.SGD, lr=0.01), freeze_blocks=1)  # builds offline
    with pytest.raises(PretrainedNotFoundError, match="vit_small_digits.pt.*model=backbone_pretrain"):
        _fit(model, _datamodule(noise_set), tmp_path, steps=1)
    with pytest.raises(ValueError, match="head must be one of"):
        ViTOE(backbone=TINY, optimizer=None, head="ternary")


@pytest.mark.parametrize("option", ["vit_oe", "vit_oe_b16"])
def test_model_configs(compose_config, option):
    cfg = compose_config("train", [f"model={option}"])
    model_cfg = cfg.model
    optimizer = model_cfg.optimizer
    small = option == "vit_oe"  # the small-set recipe (chosen on digits): lr ×40, half the blocks frozen
    assert optimizer._target_ == "torch.optim.SGD" and optimizer.lr == (1.6e-2 if small else 4e-4)
    if small:  # the FITYMI pipelines' OE recipe (oe.*) is the same recipe as the model's own defaults
        oe = compose_config("train", ["experiment=fitymi_animals"]).oe
        assert (oe.lr, oe.freeze_blocks) == (optimizer.lr, model_cfg.freeze_blocks)
    assert optimizer.weight_decay == 5e-5
    assert optimizer.momentum == 0.0
    if option == "vit_oe":
        assert model_cfg.backbone.pretrained.endswith("/backbones/vit_small_animal_mnist_30ep/backbone.pt")
        assert model_cfg.freeze_blocks == 2 and model_cfg.backbone.image_size == 32
        model = hydra.utils.instantiate(model_cfg)  # the weights load at fit, so this works offline
        assert isinstance(model, ViTOE) and model.backbone.feature_dim == 128 and len(model.backbone.blocks) == 6
        assert ViTOE.trainable and not ViTOE.generates
        cfg = compose_config("train", [f"model={option}", "model.pretrained_on=digits"])
        assert cfg.model.backbone.pretrained.endswith("/backbones/vit_small_digits_30ep/backbone.pt")
    else:
        assert model_cfg.backbone.arch == "vit_b_16" and model_cfg.backbone.image_size == 224
        assert model_cfg.backbone.pretrained.startswith("IMAGENET1K") and model_cfg.freeze_blocks == 6
        assert model_cfg.augment.kind == "resize_crop" and model_cfg.backbone.resize_to == 256


def test_knn_backbone_detector_config(compose_config, tmp_path, pretrained):
    cfg = compose_config("evaluate", ["detector=knn_backbone", f"detector.extractor.checkpoint={pretrained}",
                                      "detector.extractor.device=cpu"])
    detector = hydra.utils.instantiate(cfg.detector)
    assert detector.scorer.k == 2 and detector.scorer.distance == "squared"
    normals = [{"image": torch.rand(5, 3, 8, 8)}]
    assert detector.fit(normals).score(normals).shape == (5,)


def test_pretraining_on_the_tasks_own_dataset_warns(tmp_path, noise_set):
    path = save_backbone(build_vit(**TINY), tmp_path / "vit_small_digits.pt",
                         {"stage": "pretrain", "dataset": "digits", "classes": [str(d) for d in range(10)]})
    model = ViTOE(backbone={**TINY, "pretrained": str(path)}, optimizer=functools.partial(torch.optim.SGD, lr=0.01),
                  freeze_blocks=1, pretrained_on="digits")
    with pytest.warns(UserWarning, match="the task's own dataset"):
        _fit(model, _datamodule(noise_set), tmp_path, steps=1)
