"""model=asyrp: fit then export a set whose α is in range and recorded, the same for any batch size; each training
image inverted once; only DeltaH in the optimizer and the checkpoint; the config runs through train.py."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from PIL import Image

from anomgen.data import Digits
from anomgen.data.synthetic import read_manifest
from anomgen.diffusion import tiny_score_unet
from anomgen.generators.asyrp import OpenCLIPGuide
from callbacks import SyntheticSetExport
from datamodules import AnomalyDataModule
from models.asyrp import AsyrpModel

ALPHA = (0.5, 1.5)




def _model(tiny_clip_name, seed=0, **kw):
    torch.manual_seed(seed)
    return AsyrpModel(unet=tiny_score_unet("vp", image_size=16), clip=OpenCLIPGuide(tiny_clip_name, pretrained=None),
                      optimizer=functools.partial(torch.optim.Adam, lr=1e-2),
                      target_text="a photo of a damaged {class}",
                      num_inference_steps=5, t_edit=400, alpha_min=ALPHA[0], alpha_max=ALPHA[1], seed=seed, **kw)


def _datamodule(**kw):
    return AnomalyDataModule(dataset=functools.partial(Digits), normal_class="3", **kw)


def _trainer(**kw):
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   **kw)


def _pixels(set_dir, row):
    return np.asarray(Image.open(set_dir / row["image"]), dtype=np.int16)


def test_fit_then_export_records_alpha_and_is_batch_size_independent(tiny_clip_name, tmp_path):
    model = _model(tiny_clip_name)
    trainer = _trainer(fast_dev_run=2)
    trainer.fit(model, datamodule=_datamodule(batch_size=4))
    assert {"train/loss", "train/clip", "train/l1"} <= set(trainer.callback_metrics)
    assert model.asyrp.delta_h.conv_out.weight.abs().sum() > 0  # DeltaH left its zero start

    sets = {}
    for batch_size in (1, 3):
        model.sources.clear()  # invert again, in other batches
        out = tmp_path / f"bs{batch_size}"
        _trainer(callbacks=[SyntheticSetExport(str(out))]).predict(
            model, datamodule=_datamodule(num_generated=5, eval_batch_size=batch_size), return_predictions=False)
        sets[batch_size] = out
    rows = {b: read_manifest(s) for b, s in sets.items()}
    assert rows[1] == rows[3] and len(rows[1]) == 5
    datamodule = _datamodule()
    datamodule.setup()
    for i, row in enumerate(rows[1]):
        assert row["sources"] == [datamodule.support[i]["image_path"]]  # request i edits support image i
        # rounding of batched convolutions may move a pixel by one level, never more
        assert np.abs(_pixels(sets[1], row) - _pixels(sets[3], row)).max() <= 1
        params = row["params"]
        assert ALPHA[0] <= params["alpha"] <= ALPHA[1]
        assert params["t_edit"] == 400 and params["seed"] == 0
        assert params["target_text"] == "a photo of a damaged 3"
        assert row["label"] == 1 and row["generator"] == "asyrp" and row["defect_type"] == "asyrp"
        assert _pixels(sets[1], row).shape == (16, 16, 3)
    alphas = [r["params"]["alpha"] for r in rows[1]]
    assert len(set(alphas)) == len(alphas)  # one draw per sample

    model.seed = 1  # another seed: other strengths
    out = tmp_path / "seed1"
    _trainer(callbacks=[SyntheticSetExport(str(out))]).predict(
        model, datamodule=_datamodule(num_generated=5, eval_batch_size=5), return_predictions=False)
    other = [r["params"]["alpha"] for r in read_manifest(out)]
    assert all(ALPHA[0] <= a <= ALPHA[1] for a in other) and other != alphas


def test_each_training_image_is_inverted_once(tiny_clip_name):
    model = _model(tiny_clip_name)
    prepared = []
    prepare = model.asyrp.prepare
    model.asyrp.prepare = lambda images: prepared.append(len(images)) or prepare(images)
    _trainer(max_epochs=3).fit(model, datamodule=_datamodule(k_shot=4, batch_size=2))
    assert sum(prepared) == 4 and len(model.sources) == 4  # 3 epochs of 2 batches, 4 images prepared once
    # x_T and the unedited prediction at each edit timestep
    assert all(t.shape == (1 + len(model.asyrp.edit_timesteps), 3, 16, 16) for t in model.sources.values())


def test_a_training_step_walks_every_edit_timestep_with_one_optimizer_step_each(tiny_clip_name):
    """Asyrp_official's loop: one batch visits every t ≥ t_edit, descending, along the edited trajectory (the
    generator test writes that trajectory out), with an optimizer step at each t; not one random t per batch."""
    model = _model(tiny_clip_name)
    assert model.asyrp.edit_timesteps == [999, 749, 499]  # 5 steps: 999, 749, 499, 249, 0; t_edit = 400
    visited = []
    model.asyrp.delta_h.register_forward_pre_hook(lambda m, args: visited.append(int(args[1])))
    trainer = _trainer(max_epochs=1, limit_train_batches=2)
    trainer.fit(model, datamodule=_datamodule(k_shot=4, batch_size=2))
    assert visited == [999, 749, 499] * 2
    assert trainer.global_step == 6  # optimizer steps: one per edit timestep of each batch


def test_only_deltah_is_optimised_and_checkpointed(tiny_clip_name, tmp_path):
    model = _model(tiny_clip_name)
    optimizer = model.configure_optimizers()
    optimised = [p for group in optimizer.param_groups for p in group["params"]]
    assert [id(p) for p in optimised] == [id(p) for p in model.asyrp.delta_h.parameters()]
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, max_steps=2,
                      default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=_datamodule(k_shot=4, batch_size=2))
    path = tmp_path / "asyrp.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)["state_dict"]
    assert set(state) == {f"asyrp.delta_h.{k}" for k in model.asyrp.delta_h.state_dict()}

    trained = model.asyrp.delta_h.state_dict()
    loaded = AsyrpModel.load_from_checkpoint(path, unet=model.asyrp.eps_model.unet, clip=model.asyrp.clip,
                                             optimizer=model.optimizer_factory)
    assert loaded.hparams.t_edit == 400 and loaded.asyrp.schedule.timesteps == model.asyrp.schedule.timesteps
    assert all(torch.equal(loaded.asyrp.delta_h.state_dict()[k], v) for k, v in trained.items())
    fresh = _model(tiny_clip_name, seed=1)
    assert not torch.equal(fresh.asyrp.delta_h.conv_in.weight, trained["conv_in.weight"])
    fresh.load_state_dict(state)
    assert all(torch.equal(fresh.asyrp.delta_h.state_dict()[k], v) for k, v in trained.items())
    with pytest.raises(RuntimeError, match="unexpected keys \\['asyrp.delta_h.extra'\\]"):
        fresh.load_state_dict({**state, "asyrp.delta_h.extra": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="missing DeltaH keys"):
        fresh.load_state_dict({k: v for k, v in state.items() if not k.endswith("conv_out.bias")})


def test_alpha_range_is_checked(tiny_clip_name):
    with pytest.raises(ValueError, match="alpha_min"):
        AsyrpModel(unet=tiny_score_unet("vp", image_size=16), clip=OpenCLIPGuide(tiny_clip_name, pretrained=None),
                   optimizer=functools.partial(torch.optim.Adam), alpha_min=2.0, alpha_max=1.0)


def test_config_runs_through_train_py(compose_config, tmp_path):
    """model=asyrp composes; with a tiny UNet and a random small CLIP it fits and exports through train.py."""
    from anomgen.data.synthetic import SyntheticSet
    from train import train

    unet = ("{sample_size:16,block_out_channels:[16,32],layers_per_block:1,norm_num_groups:8,attention_head_dim:8,"
            "down_block_types:[DownBlock2D,AttnDownBlock2D],up_block_types:[AttnUpBlock2D,UpBlock2D]}")
    overrides = ["model=asyrp", "debug=tiny", "+trainer.fast_dev_run=true", "logger=csv", "model.unet.source=null",
                 f"model.unet.config={unet}", "model.clip.model_name=ViT-S-32-alt", "model.clip.pretrained=null",
                 "model.num_inference_steps=4"]
    cfg = compose_config("train", overrides, run_dir=tmp_path / "train")
    assert cfg.model.unet._target_ == "anomgen.diffusion.unets.load_diffusion_unet"
    metrics, _, _ = train(cfg)
    exported = SyntheticSet(cfg.synthetic_set_dir)
    assert len(exported) == metrics["predict/num_exported"] > 0
    assert all(ALPHA[0] <= r["params"]["alpha"] <= ALPHA[1] for r in exported.rows)


def test_default_config_names_the_guided_diffusion_checkpoint(compose_config):
    cfg = compose_config("train", ["model=asyrp"])
    assert str(cfg.model.unet.source).endswith("/256x256_diffusion_uncond.pt")
    assert cfg.model.unet.source.startswith(cfg.paths.pretrained_dir)
    assert cfg.model.clip.pretrained == "openai" and cfg.model.optimizer.lr == pytest.approx(1e-3)
