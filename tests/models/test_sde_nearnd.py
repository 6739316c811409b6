"""model=sde_nearnd with FID early stopping: stops at the target, exports bands with their FID, resumes the schedule,
and exports the same set whatever the batch size (samples seeded by their global index)."""

from __future__ import annotations

import functools

import pytest
import torch
from lightning.pytorch import Trainer

from anomgen.data import Digits
from anomgen.data.synthetic import read_manifest
from anomgen.diffusion import tiny_score_unet
from anomgen.encoders import RawPixels
from callbacks import FIDEarlyStopping, SyntheticSetExport
from datamodules import AnomalyDataModule
from models.sde_nearnd import SDENearND


def _model(seed=0, lr=2e-3):
    torch.manual_seed(seed)
    return SDENearND(unet=tiny_score_unet("vp", image_size=8, channels=1), sde={"kind": "vp"},
                     optimizer=functools.partial(torch.optim.Adam, lr=lr), warmup_steps=1, num_steps=4,
                     corrector_steps=1, seed=seed)


def _datamodule(**kw):
    return AnomalyDataModule(dataset=functools.partial(Digits), normal_class="3", batch_size=32, **kw)


def _trainer(callbacks, max_steps=6, **kw):
    return Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, callbacks=callbacks, **kw)


def test_fid_stopping_triggers_at_the_target():
    fid = FIDEarlyStopping(RawPixels(), every_n_steps=2, num_samples=16, target=1e9)
    trainer = _trainer([fid], max_steps=10)
    trainer.fit(_model(), datamodule=_datamodule())
    assert trainer.global_step == 2 and fid.stopped_at[0] == 2
    assert fid.curve == [(2, fid.stopped_at[1])]


def test_fid_factor_target_bands_and_resume(tmp_path):
    fid = FIDEarlyStopping(RawPixels(), every_n_steps=2, num_samples=16, target_factor=1e-9,
                           bands=[[None, None]], export_dir=str(tmp_path / "bands"), export_size=5)
    model = _model()
    trainer = _trainer([fid], max_steps=4)
    trainer.fit(model, datamodule=_datamodule())
    assert [s for s, _ in fid.curve] == [2, 4] and fid.stopped_at is None  # the target is never reached
    assert fid.reference_fid > 0 and fid.target_fid == pytest.approx(1e-9 * fid.reference_fid)
    logged = trainer.callback_metrics
    assert logged["train/fid_reference"].item() == pytest.approx(fid.reference_fid)
    assert logged["train/fid_target"].item() == pytest.approx(fid.target_fid)
    assert logged["train/fid_band_export"].item() == pytest.approx(fid.curve[0][1])  # the check that exported
    rows = read_manifest(tmp_path / "bands" / "fid_0-inf")
    assert len(rows) == 5 and all(r["params"]["fid"] == pytest.approx(fid.curve[0][1]) for r in rows)
    assert list(fid.exported) == ["fid_0-inf"]  # a band is exported once, when the FID first enters it
    resumed = FIDEarlyStopping(RawPixels(), every_n_steps=2, num_samples=16)
    resumed.load_state_dict(fid.state_dict())
    assert resumed.curve == fid.curve and resumed.exported == fid.exported


def test_checks_are_refined_near_the_target(monkeypatch):
    fid = FIDEarlyStopping(RawPixels(), every_n_steps=10, num_samples=8, target=10.0, refine_every_n_steps=3,
                           refine_factor=2.0, grid_size=0)
    scripted = iter([100.0, 25.0, 15.0, 12.0, 9.0])  # coarse, coarse (> 2 × 10), then refined down to the stop
    monkeypatch.setattr(fid, "measure", lambda trainer, module: next(scripted))
    trainer = _trainer([fid], max_steps=60)
    trainer.fit(_model(), datamodule=_datamodule())
    assert fid.curve == [(10, 100.0), (20, 25.0), (30, 15.0), (33, 12.0), (36, 9.0)]
    assert fid.stopped_at == (36, 9.0) and trainer.global_step == 36


def test_every_rank_decides_on_rank_zeros_fid(monkeypatch):
    """Under DDP each rank measures the FID of the same seeded samples, but the stop and the band exports follow rank
    0's value (broadcast), never a rank's own, which could round differently on another device."""
    fid = FIDEarlyStopping(RawPixels(), every_n_steps=2, num_samples=8, target=10.0, grid_size=0)
    monkeypatch.setattr(fid, "measure", lambda trainer, module: 50.0)  # this rank's FID: above the target
    trainer = _trainer([fid], max_steps=10)
    broadcasts = []

    def rank_zero_fid(obj, src=0):
        if not isinstance(obj, float):  # Lightning broadcasts other things (the log dir) too
            return obj
        broadcasts.append((obj, src))
        return 5.0  # rank 0's FID: below the target

    monkeypatch.setattr(trainer.strategy, "broadcast", rank_zero_fid)
    trainer.fit(_model(), datamodule=_datamodule())
    assert broadcasts == [(50.0, 0)] and fid.curve == [(2, 5.0)] and fid.stopped_at == (2, 5.0)
    assert trainer.global_step == 2


def test_under_ddp_each_rank_samples_its_share_and_the_fid_is_the_one_device_fid():
    """Every rank used to sample all of a check's images. Rank r now samples r, r + world, ... (seeded by index) and
    the features are gathered in order, so the FID is the one-device FID of the same samples. Two ranks are played in
    turn: rank 1's gather is recorded, then rank 0 gathers its own features and rank 1's (an odd count: padding)."""
    from types import SimpleNamespace

    model = _model().eval()
    dm = _datamodule()
    dm.setup("fit")
    fid = FIDEarlyStopping(RawPixels(), every_n_steps=2, num_samples=7, target=1.0, grid_size=0, batch_size=3)
    sampled: list[int] = []
    sample = model.sample
    model.sample = lambda indices, seed: sampled.extend(indices) or sample(indices, seed=seed)

    one_device = fid.measure(SimpleNamespace(datamodule=dm, world_size=1, global_rank=0), model)
    assert sampled == list(range(7))
    sent: dict[int, torch.Tensor] = {}

    class TwoRanks:
        world_size = 2

        def __init__(self, rank: int) -> None:
            self.rank = rank

        def all_gather(self, tensor):
            sent[self.rank] = tensor
            return torch.stack([sent.get(0, tensor), sent.get(1, tensor)])

    for rank in (1, 0):
        sampled.clear()
        fid_of_rank = fid.measure(SimpleNamespace(datamodule=dm, world_size=2, global_rank=rank,
                                                  strategy=TwoRanks(rank)), model)
        assert sampled == list(range(rank, 7, 2))  # its share only
        assert len(sent[rank]) == 4  # padded to ceil(7 / 2) rows
    assert fid_of_rank == pytest.approx(one_device, rel=1e-4)


@pytest.mark.parametrize("kw, message", [
    (dict(target=1.0, refine_every_n_steps=20), "1..every_n_steps"),
    (dict(target=1.0, refine_every_n_steps=2, refine_factor=1.0), "> 1"),
    (dict(refine_every_n_steps=2), "set target or target_factor"),
])
def test_refined_checks_reject_bad_settings(kw, message):
    with pytest.raises(ValueError, match=message):
        FIDEarlyStopping(RawPixels(), every_n_steps=10, **kw)


def test_export_is_the_same_for_any_batch_size(tmp_path):
    model = _model()
    _trainer([], max_steps=2).fit(model, datamodule=_datamodule())
    sets = []
    for batch_size in (3, 7):
        out = tmp_path / f"bs{batch_size}"
        trainer = _trainer([SyntheticSetExport(str(out))])
        trainer.predict(model, datamodule=_datamodule(num_generated=9, eval_batch_size=batch_size),
                        return_predictions=False)
        sets.append(out)
    rows = [read_manifest(s) for s in sets]
    assert rows[0] == rows[1] and len(rows[0]) == 9
    for row in rows[0]:
        assert (sets[0] / row["image"]).read_bytes() == (sets[1] / row["image"]).read_bytes()
    assert rows[0][0]["params"]["sde"] == "vp" and rows[0][0]["sources"] == []


def test_nan_loss_names_the_step():
    model = _model(lr=1e6)  # diverges
    with pytest.raises(FloatingPointError, match="at step"):
        _trainer([], max_steps=200).fit(model, datamodule=_datamodule())


def test_fid_checks_log_sample_grids_to_wandb(tmp_path):
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(project="anomgen-test", save_dir=str(tmp_path), offline=True)
    fid = FIDEarlyStopping(RawPixels(), every_n_steps=2, num_samples=8, target=1e9, grid_size=4)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=4, logger=logger, enable_checkpointing=False,
                      enable_progress_bar=False, callbacks=[fid])
    trainer.fit(_model(), datamodule=_datamodule())
    wandb.finish()
    assert fid.last_samples.shape == (4, 3, 8, 8)
    assert list(tmp_path.glob("wandb/offline-run-*/files/media/images/**/*.png")), "no sample grid reached W&B"


class _SpyDigits(Digits):
    """Digits that log every record read: (split, image_path), into the class-level ``reads``."""

    reads: list = []

    def __getitem__(self, index):
        record = super().__getitem__(index)
        _SpyDigits.reads.append((self.split, record["image_path"]))
        return record


def test_fid_reference_reads_the_normal_training_images_never_the_test_split(monkeypatch):
    """FITYMI's FID is against the normal training images. A spy dataset logs each record read while the callback
    builds its reference statistics (``_stats`` calls inside ``_real``): the real statistics read exactly the
    training normals (class "3" of the train split, the held-out normals apart), the held-out reference of
    ``target_factor`` reads the held-out normals (also train split), and nothing is read from the test split. The
    mean of the reference statistics is checked against the digits read straight from scikit-learn."""
    from sklearn.datasets import load_digits

    _SpyDigits.reads = []
    fid = FIDEarlyStopping(RawPixels(), every_n_steps=2, num_samples=8, target_factor=1e-9, grid_size=0)
    calls, inside_real = [], []
    real, stats = fid._real, fid._stats

    def spy_real(trainer):
        inside_real.append(True)
        try:
            return real(trainer)
        finally:
            inside_real.pop()

    def spy_stats(images_or_loader):
        start = len(_SpyDigits.reads)
        out = stats(images_or_loader)
        if inside_real:
            calls.append(list(_SpyDigits.reads[start:]))
        return out

    monkeypatch.setattr(fid, "_real", spy_real)
    monkeypatch.setattr(fid, "_stats", spy_stats)
    dm = AnomalyDataModule(dataset=functools.partial(_SpyDigits), normal_class="3", batch_size=32)
    _trainer([fid], max_steps=4).fit(_model(), datamodule=dm)

    assert len(fid.curve) == 2 and len(calls) == 2  # cached: the reference is read once, at the first check
    train_reads, held_out_reads = calls
    test_paths = {r.image_path for r in dm.test_set.entries}
    for reads in calls:
        assert {split for split, _ in reads} == {"train"}
        assert not {path for _, path in reads} & test_paths
    train_paths = [path for _, path in train_reads]
    assert sorted(train_paths) == sorted(e.image_path for e in dm.train_normals.entries)
    assert len(set(train_paths)) == len(train_paths)  # each training normal once
    assert {p for _, p in held_out_reads} == {e.image_path for e in dm.val_normals.entries}
    assert not {p for _, p in held_out_reads} & set(train_paths)

    # by hand: the digits behind the paths ("sklearn-digits:<index>") are 3s, and their grey pixels average to μ
    digits = load_digits()
    index = [int(p.split(":")[1]) for p in train_paths]
    assert set(digits.target[index].tolist()) == {3}
    pixels = torch.tensor(digits.images[index] * 255 / 16).round() / 255  # the shipped 0..16 scaled to 8 bits
    mu, _ = fid._real_stats
    torch.testing.assert_close(mu, pixels.flatten(1).mean(0).to(mu.dtype), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("validation", ["holdout", "none"])
def test_with_an_absolute_target_the_fid_reference_reads_every_normal_training_image(validation):
    """The paper's FID is against every normal training image. With an absolute target, a spy dataset shows that the
    reference statistics read each class-3 image of the train split exactly once (listed here from the parser's
    entries, not from the datamodule), the datamodule's held-out normals included, and nothing of the test split.
    With ``validation="none"`` (the paper pipelines' sde stage) there is no holdout, so the SDE's training data and its
    fake count (one per support image) are every normal training image too."""
    _SpyDigits.reads = []
    fid = FIDEarlyStopping(RawPixels(), every_n_steps=2, num_samples=8, target=1e-9, grid_size=0)
    dm = AnomalyDataModule(dataset=functools.partial(_SpyDigits), normal_class="3", batch_size=32,
                           validation=validation)
    dm.setup("fit")
    _SpyDigits.reads = []
    fid._real(type("T", (), {"datamodule": dm})())
    every_normal = sorted(e.image_path for e in Digits(split="train").entries if e.category == "3")
    reads = _SpyDigits.reads
    assert {split for split, _ in reads} == {"train"}
    assert sorted(path for _, path in reads) == every_normal  # each once, held-out ones included
    assert fid.reference_fid is None
    if validation == "none":
        assert len(dm.support) == len(every_normal)  # what the SDE trains on and how many fakes it makes
    else:
        assert 0 < len(dm.val_normals) < len(every_normal)


def test_the_paper_pipelines_sde_stage_keeps_no_holdout(compose_config):
    """configs/fitymi/paper.yaml: the sde stage runs with datamodule.validation=none and an absolute FID target."""
    for experiment in ("fitymi_cifar10", "fitymi_mvtec", "fitymi_cub"):
        cfg = compose_config("train", [f"experiment={experiment}"])
        assert "datamodule.validation=none" in cfg.pipeline.sde.overrides
        assert cfg.callbacks.fid_early_stopping.target is not None
        assert cfg.callbacks.fid_early_stopping.target_factor is None


def test_fid_check_samples_with_the_ema_after_that_steps_update(monkeypatch):
    """The FID check at step N must sample with the EMA of N updates (the weights after step N averaged in), not N − 1
    (the callbacks' ``on_train_batch_end`` runs before the module's). A recorder callback keeps the raw weights after
    every optimizer step; a spy on the sampler keeps the weights the check samples with; the EMA is computed by hand:
    s_0 = the initial weights, s_n = d_n s_{n−1} + (1 − d_n) w_n, d_n = min(0.999, (1 + n)/(10 + n))."""
    from lightning.pytorch import Callback

    import models.sde_nearnd as sde_module

    model = _model(lr=5e-2)

    def params():
        return {n: p.detach().clone() for n, p in model.unet.named_parameters()}

    initial, raw, sampled = params(), [], []

    class Recorder(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            raw.append(params())

    pc_sample = sde_module.pc_sample

    def spy(*args, **kwargs):
        sampled.append((len(raw), params()))  # inside the model's EMA swap: the weights the check evaluates
        return pc_sample(*args, **kwargs)

    monkeypatch.setattr(sde_module, "pc_sample", spy)
    fid = FIDEarlyStopping(RawPixels(), every_n_steps=2, num_samples=8, grid_size=0)
    _trainer([Recorder(), fid], max_steps=2).fit(model, datamodule=_datamodule())

    assert fid.curve and fid.curve[0][0] == 2 and len(raw) == 2
    (steps_done, evaluated), = sampled
    assert steps_done == 2

    def hand_ema(n_updates):
        shadow = {k: v.clone() for k, v in initial.items()}
        for n in range(1, n_updates + 1):
            d = min(0.999, (1 + n) / (10 + n))
            shadow = {k: d * shadow[k] + (1 - d) * raw[n - 1][k] for k in shadow}
        return shadow

    after, stale = hand_ema(2), hand_ema(1)
    assert max((after[k] - stale[k]).abs().max().item() for k in after) > 1e-3  # the two differ visibly
    for name, weight in evaluated.items():
        torch.testing.assert_close(weight, after[name], atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
    for name, weight in model.unet.named_parameters():  # the raw weights are back after the check
        torch.testing.assert_close(weight.detach(), raw[-1][name])


def test_the_ve_sde_is_built_and_trains_through_the_config(compose_config, run_train, tmp_path):
    """model.sde.kind=ve (documented in configs/model/sde_nearnd.yaml) builds the VE SDE from sigma_min / sigma_max and
    a Fourier-embedding UNet; a training step and a two-step export run (it failed with "unexpected keyword
    'beta_min'"). The default stays VP with beta_min / beta_max."""
    import hydra

    from anomgen.data.synthetic import SyntheticSet
    from anomgen.diffusion import VESDE, VPSDE

    ve = hydra.utils.instantiate(compose_config("train", ["model=sde_nearnd", "model.sde.kind=ve"]).model)
    assert isinstance(ve.sde, VESDE) and (ve.sde.sigma_min, ve.sde.sigma_max) == (0.01, 50.0)
    assert ve.unet.config.time_embedding_type == "fourier"
    vp = hydra.utils.instantiate(compose_config("train", ["model=sde_nearnd"]).model)
    assert isinstance(vp.sde, VPSDE) and (vp.sde.beta_min, vp.sde.beta_max) == (0.1, 20.0)
    metrics, run_dir, _ = run_train(["model=sde_nearnd", "model.sde.kind=ve", "model.num_steps=2", "logger=none",
                                     "+trainer.fast_dev_run=true", "trainer.accelerator=cpu"], tmp_path / "ve")
    assert torch.isfinite(torch.as_tensor(metrics["train/loss"]))
    made = SyntheticSet(run_dir / "synthetic_set")
    assert len(made) > 0 and {row["params"]["sde"] for row in made.rows} == {"ve"}
