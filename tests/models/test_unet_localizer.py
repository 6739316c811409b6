"""The U-Net localizer (METHODS.md §4): DRAEM's network against anomalib's, the focal loss and the image score by
hand, seeded Perlin pairs, the pair sources' data module (a set without masks, validation without the test split),
checkpoint selection on held-out generated pairs, the detector, and experiment=localizer_mvtec end to end."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from anomgen.data import MVTecAD
from anomgen.data.layouts import write_mvtec
from anomgen.data.synthetic import write_set
from anomgen.detectors.localizer import (
    DiscriminativeSubNetwork,
    UNetLocalizer,
    anomaly_map,
    focal_loss,
    image_scores,
    load_localizer,
    save_localizer,
)
from anomgen.errors import ConfigError, SyntheticSetError
from anomgen.generators.perlin import PerlinAnomalies, PerlinPairs

SIZE = 32


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory) -> str:
    return write_mvtec(tmp_path_factory.mktemp("mvtec"), categories=("bottle",), n_train=6, n_test_good=2,
                       defects=("broken",), n_per_defect=2, size=SIZE)


def _pair_set(folder: Path, n: int = 6, masks: bool = True) -> Path:
    """A synthetic set of ``n`` anomalies (32 px), with a rectangle mask each or none."""
    samples = []
    for i in range(n):
        gen = torch.Generator().manual_seed(i)
        mask = torch.zeros(SIZE, SIZE)
        mask[4 + i : 12 + i, 6 : 16] = 1.0
        samples.append({"image": torch.rand(3, SIZE, SIZE, generator=gen), "mask": mask if masks else None,
                        "label": 1, "generator": "made_up", "category": "bottle"})
    return write_set(folder, samples, {"generator": "made_up"})


def _datamodule(root: str, **kwargs):
    from datamodules import LocalizerDataModule

    dataset = partial(MVTecAD, root=root, category="bottle", image_size=SIZE)
    options = dict(protocol="defects", batch_size=4, eval_batch_size=8, holdout_fraction=0.34, samples_per_epoch=8)
    return LocalizerDataModule(dataset, **{**options, **kwargs})


# -- network, loss, score ------------------------------------------------------------------------------------------


def test_network_is_draems_discriminative_subnetwork(one_thread):
    """Same modules, parameter count and output as anomalib's DRAEM DiscriminativeSubNetwork with the same weights."""
    from anomalib.models.image.draem.torch_model import DiscriminativeSubNetwork as Reference

    def count(module):
        return sum(p.numel() for p in module.parameters())

    # the paper's width: 28.4 M parameters in both (built only, not run)
    assert count(DiscriminativeSubNetwork(3, 2, 64)) == count(Reference(3, 2, 64)) == 28_372_418
    torch.manual_seed(0)
    ours, ref = DiscriminativeSubNetwork(3, 2, 8), Reference(3, 2, 8)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    ours.load_state_dict(ref.state_dict(), strict=True)
    images = torch.rand(2, 3, 64, 64)
    for mode in ("train", "eval"):  # batch statistics, then running statistics
        ours.train(mode == "train")
        ref.train(mode == "train")
        out = ours(images)
        assert out.shape == (2, 2, 64, 64)
        torch.testing.assert_close(out, ref(images), rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiples of 32"):
        ours(torch.rand(1, 3, 48, 40))


def test_focal_loss_matches_a_hand_computation():
    # two pixels: logits (0, 1) labelled anomalous, (2, 0) labelled normal
    logits = torch.tensor([[[[0.0, 2.0]], [[1.0, 0.0]]]])  # 1 × 2 × 1 × 2
    masks = torch.tensor([[[1.0, 0.0]]])
    s = 1e-5
    expected = 0.0
    for z_normal, z_anomalous, label in ((0.0, 1.0, 1), (2.0, 0.0, 0)):
        p_anomalous = math.exp(z_anomalous) / (math.exp(z_normal) + math.exp(z_anomalous))
        p = (p_anomalous, 1.0 - p_anomalous)[::-1]  # (p_normal, p_anomalous)
        target = [s, s]
        target[label] = 1.0 - s
        pt = target[0] * p[0] + target[1] * p[1] + s
        expected += -((1.0 - pt) ** 2) * math.log(pt) / 2
    assert focal_loss(logits, masks).item() == pytest.approx(expected, rel=1e-6)
    # without smoothing it is the textbook focal loss (α 1, γ 2) summed over the classes: kornia's
    import kornia

    torch.manual_seed(0)
    logits, masks = torch.randn(2, 2, 5, 7), (torch.rand(2, 5, 7) > 0.6).float()
    reference = kornia.losses.focal_loss(logits, masks.long(), alpha=None, gamma=2.0, reduction="none").sum(1).mean()
    torch.testing.assert_close(focal_loss(logits, masks, smooth=0.0), reference)
    torch.testing.assert_close(focal_loss(logits, masks[:, None]), focal_loss(logits, masks))  # B × 1 × H × W masks


def test_image_score_is_the_max_of_the_21x21_average():
    torch.manual_seed(0)
    maps = torch.rand(2, 40, 36) ** 4
    padded = np.pad(maps.numpy().astype(np.float64), ((0, 0), (10, 10), (10, 10)))  # zeros count in the average
    expected = [max(padded[b, y : y + 21, x : x + 21].sum() / 441.0 for y in range(40) for x in range(36))
                for b in range(2)]
    np.testing.assert_allclose(image_scores(maps).numpy(), expected, rtol=1e-5)
    corner = torch.zeros(1, 32, 32)
    corner[0, 0, 0] = 1.0  # one anomalous pixel in a corner: every window holding it averages 1/441
    assert image_scores(corner).item() == pytest.approx(1.0 / 441.0)
    logits = torch.randn(1, 2, 4, 4)
    torch.testing.assert_close(anomaly_map(logits), torch.softmax(logits, 1)[:, 1])


# -- Perlin pairs ---------------------------------------------------------------------------------------------------


def test_perlin_pairs_are_seeded_per_sample(one_thread):
    image = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = PerlinAnomalies(seed=0)(image, 5)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random state is left as it was
    torch.manual_seed(999)  # another global state, another instance: the same pair
    again = PerlinAnomalies(seed=0)(image, 5)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(PerlinAnomalies(seed=0)(image, 6)[1], first[1])  # another sample
    assert not torch.equal(PerlinAnomalies(seed=1)(image, 5)[1], first[1])  # another seed
    out, mask, _ = first
    assert set(mask.unique().tolist()) <= {0.0, 1.0} and mask.sum() > 0
    assert torch.equal(out[:, mask == 0], image[:, mask == 0])  # only the masked pixels change
    assert 0.0 <= out.min() and out.max() <= 1.0
    normals = [{"image": image, "image_path": f"n{i}.png", "category": "bottle"} for i in range(3)]
    pairs = PerlinPairs(normals, PerlinAnomalies(seed=0))
    record = pairs.pair(5)  # any index; the normal is normals[5 % 3]
    assert record["image_path"] == "n2.png#perlin-5" and record["label"] == 1 and record["source"] == "perlin"
    assert torch.equal(record["mask"], first[1])


# -- data: pair sources and validation ------------------------------------------------------------------------------


def test_a_set_without_masks_is_refused(tmp_path, mvtec_root):
    no_masks = _pair_set(tmp_path / "no_masks", n=3, masks=False)
    with pytest.raises(SyntheticSetError, match=f"{no_masks}.*3 of 3 anomalies without a mask"):
        _datamodule(mvtec_root, pairs_set=str(no_masks))  # at construction, before any training
    with pytest.raises(ConfigError, match="datamodule.pairs=set needs datamodule.pairs_set"):
        _datamodule(mvtec_root, pairs="set")
    with pytest.raises(ConfigError, match="never picked on the test split"):
        _datamodule(mvtec_root, validation="test")


@pytest.mark.parametrize("source", ["perlin", "set"])
def test_validation_is_held_out_generated_pairs_never_the_test_split(tmp_path, mvtec_root, source, one_thread):
    pairs_set = str(_pair_set(tmp_path / "pairs")) if source == "set" else None
    dm = _datamodule(mvtec_root, pairs_set=pairs_set)
    dm.setup("fit")
    assert dm.pairs == source
    val = [b for b in dm.val_dataloader()]
    val_paths = [p for b in val for p in b["image_path"]]
    test_paths = {e.image_path for e in dm.test_set.entries}
    held_out = {e.image_path for e in dm.val_normals.entries}
    assert not {p.split("#")[0] for p in val_paths} & test_paths  # nothing of (or made from) the test split
    labels = torch.cat([b["label"] for b in val])
    assert (labels == 0).sum() == len(held_out) == 2 and (labels == 1).sum() == 2 * len(held_out)  # 2 pairs each
    assert all(b["mask"][b["label"] == 1].flatten(1).amax(1).eq(1).all() for b in val)  # the pairs' masks
    train = [b for b in dm.train_dataloader()]
    train_paths = {p.split("#")[0] for b in train for p in b["image_path"]}
    assert not train_paths & held_out  # held-out normals (and the Perlin pairs made from them) never train
    if source == "perlin":
        assert {p.split("#")[0] for p in val_paths} == held_out
    else:
        assert not {p for p in val_paths if "/images/" in p} & train_paths  # the held-out pairs leave training
    labels = torch.cat([b["label"] for b in train])
    assert len(labels) == 8 and (labels == 0).sum() == 4  # half normals, half pairs
    assert dm.describe()["num_val_pairs"] == 4


def test_oracle_pairs_are_the_real_first_third_never_the_test_split(tmp_path, one_thread):
    root = write_mvtec(tmp_path / "mvtec", categories=("bottle",), n_train=6, n_test_good=2, defects=("broken",),
                       n_per_defect=9, size=SIZE)
    with pytest.raises(ConfigError, match="datamodule.pairs=anomaly_train .*anomaly_train_fraction"):
        _datamodule(root, pairs="anomaly_train")
    with pytest.raises(ConfigError, match="datamodule.pairs=anomaly_train but datamodule.pairs_set"):
        _datamodule(root, pairs="anomaly_train", pairs_set=str(tmp_path), anomaly_train_fraction=1 / 3)
    dm = _datamodule(root, pairs="anomaly_train", anomaly_train_fraction=1 / 3, val_pairs_per_normal=1)
    dm.setup("fit")
    first_third = {e.image_path for e in dm.anomaly_train.entries}
    assert len(first_third) == 3  # 9 anomalies: the first 3 by file name
    test_paths = {e.image_path for e in dm.test_set.entries}
    assert not first_third & test_paths and len(test_paths) == 2 + 6
    val = [b for b in dm.val_dataloader()]
    val_pairs = {p for b in val for p, y in zip(b["image_path"], b["label"]) if y == 1}
    assert len(val_pairs) == 2 and val_pairs <= first_third  # one per held-out normal, from the first third
    train = [b for b in dm.train_dataloader()]
    train_pairs = {p for b in train for p, y in zip(b["image_path"], b["label"]) if y == 1}
    assert train_pairs == first_third - val_pairs  # the rest of the first third, with its ground-truth masks
    for b in train:
        for m, y in zip(b["mask"], b["label"]):
            assert (m.amax() == 1) == bool(y)
    assert dm.describe()["pairs"] == "anomaly_train"


def test_training_draws_new_pairs_every_epoch(mvtec_root, one_thread):
    dm = _datamodule(mvtec_root)
    dm.setup("fit")
    loader = dm.train_dataloader()

    def epoch(e: int) -> dict:
        loader.sampler.set_epoch(e)  # what Lightning does at every epoch start
        return {p: m for b in loader for p, m in zip(b["image_path"], b["mask"]) if "#perlin" in p}

    first, again, second = epoch(0), epoch(0), epoch(1)
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert not first.keys() & second.keys()  # epoch 1's pairs are other draws


# -- checkpoint selection -------------------------------------------------------------------------------------------


def test_checkpoint_is_the_best_epoch_on_held_out_generated_pairs(tmp_path, mvtec_root, one_thread):
    from lightning.pytorch import Callback, Trainer

    from models.unet_localizer import UNetLocalizerModel

    history = []

    class Snapshot(Callback):
        def on_validation_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                history.append((float(trainer.callback_metrics["val/pixel_AP"]),
                                {k: v.clone() for k, v in pl_module.network.state_dict().items()}))

    torch.manual_seed(0)
    dm = _datamodule(mvtec_root)
    model = UNetLocalizerModel(optimizer=partial(torch.optim.Adam, lr=3e-3), base_width=8)
    trainer = Trainer(max_epochs=4, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                      callbacks=[Snapshot()])
    trainer.fit(model, datamodule=dm)
    values = [v for v, _ in history]
    assert len(values) == 4 and len(set(values)) > 1
    best = int(np.argmax(values))
    assert model.stage_outputs == {"checkpoint": str((tmp_path / "localizer.pt").resolve())}
    network, info = load_localizer(tmp_path / "localizer.pt")
    assert info["monitor"] == "val/pixel_AP" and info["epoch"] == best
    assert info["value"] == pytest.approx(max(values)) and info["image_size"] == [SIZE, SIZE]
    assert info["data"]["selected_on"].startswith("held-out") and "test set" in info["note"]
    for key, value in network.state_dict().items():
        torch.testing.assert_close(value, history[best][1][key], rtol=0, atol=0)


def test_lr_milestones():
    from models.unet_localizer import lr_milestones

    assert lr_milestones([0.8, 0.9], 200) == [160, 180]  # the paper: 200 epochs
    assert lr_milestones([0.8, 0.9], 10) == [8, 9]
    assert lr_milestones([0.8, 0.9], 1) == [1, 1]  # never before the first epoch


# -- the detector ---------------------------------------------------------------------------------------------------


def test_detector_scores_and_maps(tmp_path, one_thread):
    torch.manual_seed(0)
    network = DiscriminativeSubNetwork(3, 2, 8).eval()
    save_localizer(network, tmp_path / "localizer.pt", {"image_size": [SIZE, SIZE]})
    detector = UNetLocalizer(checkpoint=str(tmp_path), device="cpu").fit([])  # a run folder works too
    images = torch.rand(3, 3, SIZE, SIZE)
    scores, maps = detector.predict([{"image": images[:2]}, {"image": images[2:]}])
    with torch.no_grad():
        expected = anomaly_map(network(images))
    torch.testing.assert_close(maps, expected)
    torch.testing.assert_close(scores, image_scores(expected).double())
    assert detector.map_range == (0.0, 1.0)
    # other sizes: resized to the training size for the network, maps back at the images' size
    scores48, maps48 = detector.predict([{"image": torch.rand(2, 3, 48, 48)}])
    assert maps48.shape == (2, 48, 48) and 0.0 <= maps48.min() and maps48.max() <= 1.0 and scores48.shape == (2,)
    # a bare DRAEM-style state dict (e.g. anomalib's network) loads too
    from anomalib.models.image.draem.torch_model import DiscriminativeSubNetwork as Reference

    reference = Reference(3, 2, 8).eval()
    torch.save(reference.state_dict(), tmp_path / "draem.pt")
    with torch.no_grad():
        expected = anomaly_map(reference(images))
    torch.testing.assert_close(UNetLocalizer(tmp_path / "draem.pt", device="cpu").score_maps([{"image": images}]),
                               expected)
    with pytest.raises(FileNotFoundError, match="experiment=localizer_mvtec"):
        UNetLocalizer(tmp_path / "missing.pt").fit([])


# -- the experiment -------------------------------------------------------------------------------------------------


PIXEL_KEYS = ("pixel_AUROC", "pixel_AP", "pixel_F1Max", "pixel_AUPRO")
IMAGE_KEYS = ("image_AUROC", "image_AP", "image_F1Max")


def test_localizer_experiment_end_to_end(run_train, tmp_path, one_thread):
    """`python train.py experiment=localizer_mvtec debug=tiny`: Perlin pairs, then the detector on the tiny test
    split with masks; and the same on a generated set (localizer.pairs_set=...)."""
    metrics, run_dir, _ = run_train(["experiment=localizer_mvtec", "debug=tiny", "logger=csv"], tmp_path / "run")
    for key in (*PIXEL_KEYS, *IMAGE_KEYS):
        assert 0.0 <= metrics[f"evaluate/test/unet_localizer/{key}"] <= 1.0, key
    assert math.isfinite(metrics["localizer/val/pixel_AP"])
    record = json.loads((run_dir / "run.json").read_text())
    checkpoint = Path(record["outputs"]["localizer.checkpoint"])
    assert checkpoint == run_dir / "localizer" / "localizer.pt"
    _, info = load_localizer(checkpoint)
    assert info["monitor"] == "val/pixel_AP" and info["data"]["pairs"] == "perlin" and info["image_size"] == [32, 32]
    evaluated = json.loads((run_dir / "evaluate" / "report.json").read_text())
    assert evaluated["detectors"]["unet_localizer"]["test_pixel_metrics"]["num_masks"] > 0

    pairs = _pair_set(tmp_path / "pairs")
    metrics, run_dir, _ = run_train(["experiment=localizer_mvtec", "debug=tiny", "logger=csv",
                                     f"localizer.pairs_set={pairs}"], tmp_path / "run_set")
    _, info = load_localizer(run_dir / "localizer" / "localizer.pt")
    assert info["data"]["pairs"] == "set" and info["data"]["pairs_set"] == str(pairs)
    assert 0.0 <= metrics["evaluate/test/unet_localizer/pixel_AUPRO"] <= 1.0
