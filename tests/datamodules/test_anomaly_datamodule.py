"""AnomalyDataModule on real data (scikit-learn digits) and on the tiny MVTec AD layout."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from anomgen.data import Digits, MVTecAD, layouts
from anomgen.data.digits import load_digits_arrays
from anomgen.data.synthetic import write_set
from datamodules import AnomalyDataModule
from datamodules.anomaly import TransformedView

DIGITS = functools.partial(Digits, split_seed=0, test_fraction=0.3)


def _dm(**kwargs) -> AnomalyDataModule:
    kwargs.setdefault("dataset", DIGITS)
    kwargs.setdefault("protocol", "one_vs_rest")
    kwargs.setdefault("normal_class", "3")
    dm = AnomalyDataModule(**kwargs)
    dm.setup("fit")
    return dm


def _paths(dataset) -> list[str]:
    return [e.image_path for e in dataset.entries]


def _labels(dataset) -> list[int]:
    return [e.label for e in dataset.entries]


def _records(dataset) -> list[dict]:
    return [dataset[i] for i in range(len(dataset))]


@pytest.fixture(scope="module")
def holdout_dm() -> AnomalyDataModule:
    return _dm(validation="holdout", holdout_fraction=0.2, holdout_seed=1)


@pytest.fixture(scope="module")
def digit_targets() -> np.ndarray:
    return load_digits_arrays()[1]


def _digit_index(path: str) -> int:
    prefix, index = path.split(":")
    assert prefix == "sklearn-digits"
    return int(index)


# ------------------------------------------------------------------------------------------------ one vs rest


def test_training_normals_are_class_3_of_the_train_split(holdout_dm, digit_targets):
    train_paths = set(_paths(Digits(split="train")))
    tn = holdout_dm.train_normals
    assert len(tn) > 50
    for e in tn.entries:
        assert e.category == "3" and e.label == 0 and e.defect_type == "good"
        assert digit_targets[_digit_index(e.image_path)] == 3  # the real sklearn target
        assert e.image_path in train_paths
    for r in _records(tn)[:10]:
        assert r["label"] == 0 and r["category"] == "3" and r["defect_type"] == "good"
        assert r["image"].shape == (3, 8, 8)
    # without k_shot the support set is the training normals
    assert holdout_dm.support is holdout_dm.train_normals


def test_holdout_normals_are_disjoint_from_training_and_from_the_train_split(holdout_dm):
    train = set(_paths(holdout_dm.train_normals))
    held = set(_paths(holdout_dm.val_normals))
    all_threes_train = {p for p, e in zip(_paths(Digits(split="train")), Digits(split="train").entries)
                        if e.category == "3"}  # fmt: skip
    assert held and not (train & held)
    assert train | held == all_threes_train  # together: every "3" of the train split
    assert len(held) == round(len(all_threes_train) * 0.2)
    assert set(_labels(holdout_dm.val_normals)) == {0}
    # holdout=validation set
    assert holdout_dm.val_set is holdout_dm.val_normals


def test_holdout_is_seeded(holdout_dm):
    again = _dm(validation="holdout", holdout_fraction=0.2, holdout_seed=1)
    other = _dm(validation="holdout", holdout_fraction=0.2, holdout_seed=2)
    assert _paths(again.val_normals) == _paths(holdout_dm.val_normals)
    assert _paths(other.val_normals) != _paths(holdout_dm.val_normals)
    assert len(other.val_normals) == len(holdout_dm.val_normals)


def test_test_set_is_the_test_split_labelled_one_vs_rest(holdout_dm, digit_targets):
    test_full = Digits(split="test")
    ts = holdout_dm.test_set
    assert _paths(ts) == _paths(test_full)
    labels = np.asarray(_labels(ts))
    targets = np.asarray([digit_targets[_digit_index(p)] for p in _paths(ts)])
    np.testing.assert_array_equal(labels, (targets != 3).astype(int))
    assert 0 < (labels == 0).sum() < (labels == 1).sum()
    for e in ts.entries:
        assert e.defect_type == ("good" if e.category == "3" else e.category)
    # the records carry the same labels
    batch = next(iter(holdout_dm.test_dataloader()))
    n = len(batch["label"])
    assert batch["label"].tolist() == labels[:n].tolist()


def test_no_test_image_in_train_or_validation(holdout_dm):
    test = set(_paths(holdout_dm.test_set))
    assert not (test & set(_paths(holdout_dm.train_normals)))
    assert not (test & set(_paths(holdout_dm.val_set)))
    assert not (test & set(_paths(holdout_dm.support)))


def test_validation_test_uses_the_test_set_only_when_named():
    dm = _dm(validation="test")
    assert dm.val_set is dm.test_set
    assert len(dm.val_normals) == 0  # no holdout taken from training when validating on test
    assert len(dm.train_normals) == len(_dm(validation="none").train_normals)
    val_batch = next(iter(dm.val_dataloader()))
    test_batch = next(iter(dm.test_dataloader()))
    assert val_batch["image_path"] == test_batch["image_path"]


def test_validation_none():
    dm = _dm(validation="none", holdout_fraction=0.3)
    assert dm.val_set is None and dm.val_dataloader() == []
    assert len(dm.val_normals) == 0
    n_threes = sum(e.category == "3" for e in Digits(split="train").entries)
    assert len(dm.train_normals) == n_threes


def test_validation_synthetic_needs_a_set():
    with pytest.raises(ValueError, match="validation=synthetic needs datamodule.synthetic_set"):
        AnomalyDataModule(dataset=DIGITS, normal_class="3", validation="synthetic")


def _tiny_synthetic_set(path) -> str:
    gen = torch.Generator().manual_seed(0)
    samples = []
    for i in range(3):
        mask = torch.zeros(8, 8)
        mask[2:5, 1:4] = 1
        samples.append({"image": torch.rand(3, 8, 8, generator=gen), "mask": mask, "label": 1,
                        "generator": "noise_patch", "category": "3", "sources": [f"sklearn-digits:{i:05d}"]})
    samples.append({"image": torch.rand(3, 8, 8, generator=gen), "mask": None, "label": 0,
                    "generator": "noise_patch", "category": "3"})  # fmt: skip
    return str(write_set(path, samples, {"generator": "noise_patch"}))


def test_validation_synthetic_is_holdout_normals_plus_set_anomalies(tmp_path):
    set_dir = _tiny_synthetic_set(tmp_path / "set")
    dm = _dm(validation="synthetic", synthetic_set=set_dir, holdout_fraction=0.1, eval_batch_size=64)
    n_val = len(dm.val_normals)
    assert n_val > 0
    assert len(dm.val_set) == n_val + 3  # the set's normal row is left out
    records = [dm.val_set[i] for i in range(len(dm.val_set))]
    assert [r["label"] for r in records] == [0] * n_val + [1] * 3
    assert [r["image_path"] for r in records[:n_val]] == _paths(dm.val_normals)
    assert all(r["source"] == "noise_patch" and r["mask"].sum() == 9 for r in records[n_val:])
    assert all(r["image_path"].startswith(str(tmp_path / "set")) for r in records[n_val:])
    # nothing of the test split, and the holdout still left training
    assert not (set(_paths(dm.test_set)) & {r["image_path"] for r in records})
    assert not (set(_paths(dm.train_normals)) & set(_paths(dm.val_normals)))
    batch = next(iter(dm.val_dataloader()))
    assert batch["label"].tolist() == [0] * n_val + [1] * 3
    assert batch["image"].shape == (n_val + 3, 3, 8, 8)


def test_k_shot_support_is_deterministic_by_seed():
    dm = _dm(k_shot=4, support_seed=0)
    support = _paths(dm.support)
    assert len(support) == 4 and len(set(support)) == 4
    assert set(support) <= set(_paths(dm.train_normals))
    assert set(_labels(dm.support)) == {0}
    assert _paths(_dm(k_shot=4, support_seed=0).support) == support
    assert _paths(_dm(k_shot=4, support_seed=1).support) != support
    # the support loader gives the support set in order
    batch = next(iter(dm.support_dataloader()))
    assert batch["image_path"] == support
    assert dm.describe()["support_size"] == 4


def test_k_shot_larger_than_training_set_is_an_error():
    with pytest.raises(ValueError, match="K=100000"):
        _dm(k_shot=100000)


def test_predict_dataloader_cycles_over_the_support():
    dm = _dm(k_shot=4, support_seed=3, num_generated=11, eval_batch_size=3)
    support = _paths(dm.support)
    indices, sources = [], []
    for batch in dm.predict_dataloader():
        indices += batch["index"].tolist()
        sources += batch["source"]["image_path"]
        assert batch["source"]["image"].shape[1:] == (3, 8, 8)
    assert indices == list(range(11))
    assert sources == [support[i % 4] for i in range(11)]


def test_predict_without_num_generated_makes_one_per_support_image():
    dm = _dm(k_shot=5, num_generated=None)
    assert len(dm.predict_dataloader().dataset) == 5


def test_train_dataloader_shuffles_the_support_and_applies_transform():
    dm = _dm(k_shot=6, batch_size=6, train_transform=lambda x: 1.0 - x)
    loader = dm.train_dataloader()
    assert isinstance(loader.dataset, TransformedView)
    batch = next(iter(loader))
    assert sorted(batch["image_path"]) == sorted(_paths(dm.support))
    by_path = {r["image_path"]: r["image"] for r in _records(dm.support)}
    for path, image in zip(batch["image_path"], batch["image"]):
        torch.testing.assert_close(image, 1.0 - by_path[path])


def test_setup_is_idempotent_and_describe(holdout_dm):
    before = holdout_dm.train_normals
    holdout_dm.setup("test")
    assert holdout_dm.train_normals is before
    info = holdout_dm.describe()
    assert info["dataset"] == "Digits"
    assert info["dataset_kwargs"] == {"split_seed": "0", "test_fraction": "0.3"}
    assert info["normal_class"] == "3" and info["protocol"] == "one_vs_rest"
    assert info["num_train_normals"] == len(holdout_dm.train_normals)
    assert info["num_val_normals"] == len(holdout_dm.val_normals)
    assert info["num_test"] == len(Digits(split="test"))


def test_normal_class_given_as_int():
    dm = _dm(normal_class=7, validation="none")
    assert {e.category for e in dm.train_normals.entries} == {"7"}


# -------------------------------------------------------------------------------------------------------- errors


def test_unknown_protocol():
    with pytest.raises(ValueError, match=r"protocol must be one of .*'one_vs_all'"):
        AnomalyDataModule(dataset=DIGITS, protocol="one_vs_all", normal_class="3")


def test_missing_normal_class():
    with pytest.raises(ValueError, match="normal_class is required with protocol=one_vs_rest"):
        AnomalyDataModule(dataset=DIGITS, protocol="one_vs_rest")


def test_unknown_normal_class_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown normal class '11'; valid classes: ") as info:
        _dm(normal_class="11")
    named = str(info.value).split("valid classes: ")[1].split(", ")
    assert sorted(named) == [str(d) for d in range(10)]


@pytest.mark.parametrize("fraction", [1.0, -0.1, 1.5])
def test_bad_holdout_fraction(fraction):
    with pytest.raises(ValueError, match=r"holdout_fraction must be in \[0, 1\)"):
        AnomalyDataModule(dataset=DIGITS, normal_class="3", holdout_fraction=fraction)


def test_unknown_validation_source():
    with pytest.raises(ValueError, match=r"validation must be one of .*'val'"):
        AnomalyDataModule(dataset=DIGITS, normal_class="3", validation="val")


# ------------------------------------------------------------------------------------------------- defects (MVTec)


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory) -> str:
    return layouts.write_mvtec(tmp_path_factory.mktemp("mvtec-dm"), categories=("bottle", "cable"), n_train=6,
                               n_test_good=2, defects=("broken", "crack"), n_per_defect=2, size=16)  # fmt: skip


def test_defects_protocol_on_tiny_mvtec(mvtec_root):
    dataset = functools.partial(MVTecAD, root=mvtec_root, category="bottle")
    dm = AnomalyDataModule(dataset=dataset, protocol="defects", holdout_fraction=0.34, eval_batch_size=100)
    dm.setup()
    train_parsed = MVTecAD(mvtec_root, category="bottle", split="train")
    test_parsed = MVTecAD(mvtec_root, category="bottle", split="test")
    # train normals + holdout = every train/good image, all labelled 0
    assert len(dm.val_normals) == 2 and len(dm.train_normals) == 4
    assert set(_paths(dm.train_normals)) | set(_paths(dm.val_normals)) == set(_paths(train_parsed))
    assert not (set(_paths(dm.train_normals)) & set(_paths(dm.val_normals)))
    assert all("/bottle/train/good/" in p for p in _paths(dm.train_normals))
    assert set(_labels(dm.train_normals)) == {0} and set(_labels(dm.val_normals)) == {0}
    # test labels as the parser gives them: good 0, defect folders 1 with their masks
    assert _paths(dm.test_set) == _paths(test_parsed)
    assert _labels(dm.test_set) == _labels(test_parsed)
    expected = [0 if "/test/good/" in p else 1 for p in _paths(test_parsed)]
    assert _labels(dm.test_set) == expected and sum(expected) == 4
    batch = next(iter(dm.test_dataloader()))
    assert batch["label"].tolist() == expected
    assert [bool(m.sum() > 0) for m in batch["mask"]] == [bool(v) for v in expected]
    assert batch["defect_type"] == [e.defect_type for e in test_parsed.entries]
    assert not (set(_paths(dm.test_set)) & set(_paths(dm.val_set)))
    assert dm.describe()["normal_class"] is None


def test_defects_protocol_k_shot_and_generation(mvtec_root):
    dataset = functools.partial(MVTecAD, root=mvtec_root, category="cable")
    dm = AnomalyDataModule(dataset=dataset, protocol="defects", validation="none", k_shot=2, support_seed=0,
                           num_generated=5, eval_batch_size=5)  # fmt: skip
    dm.setup()
    assert len(dm.train_normals) == 6
    support = _paths(dm.support)
    assert len(support) == 2 and all("/cable/train/good/" in p for p in support)
    batch = next(iter(dm.predict_dataloader()))
    assert batch["index"].tolist() == [0, 1, 2, 3, 4]
    assert batch["source"]["image_path"] == [support[i % 2] for i in range(5)]
    assert batch["source"]["image"].shape == (5, 3, 16, 16)


def test_anomaly_train_leaves_the_test_split_and_can_be_the_training_data(tmp_path):
    """AnomalyDiffusion's split in the datamodule: per defect type the first third by file name is ``anomaly_train``
    (with masks), the test split keeps every good image and only the other anomalies; ``train_on`` picks it."""
    root = layouts.write_mvtec(tmp_path, categories=("bottle",), n_train=4, n_test_good=2, defects=("broken", "crack"),
                               n_per_defect=4, size=16)
    dataset = functools.partial(MVTecAD, root=root, category="bottle")
    dm = AnomalyDataModule(dataset=dataset, protocol="defects", anomaly_train_fraction=1 / 3, train_on="anomaly_train",
                           batch_size=8, eval_batch_size=8)
    dm.setup()
    full = MVTecAD(root, category="bottle", split="test")
    train, test = _paths(dm.anomaly_train), _paths(dm.test_set)
    assert [p.split("/test/")[1] for p in train] == ["broken/000.png", "crack/000.png"]  # ⌊4/3⌋ = 1 per type
    assert not set(train) & set(test) and sorted(set(train) | set(test)) == sorted(_paths(full))
    assert [p for p in test if "/test/good/" in p] == [p for p in _paths(full) if "/test/good/" in p]
    assert test == [p for p in _paths(full) if p not in train]  # the dataset's order
    batch = next(iter(dm.train_dataloader()))
    assert sorted(batch["image_path"]) == sorted(train) and batch["label"].tolist() == [1, 1]
    assert all(m.sum() > 0 for m in batch["mask"]) and sorted(batch["defect_type"]) == ["broken", "crack"]
    info = dm.describe()
    assert info["num_anomaly_train"] == 2 and info["num_test"] == len(full) - 2
    plain = AnomalyDataModule(dataset=dataset, protocol="defects")
    plain.setup()
    assert plain.anomaly_train is None and _paths(plain.test_set) == _paths(full)


def test_anomaly_train_settings_are_checked():
    with pytest.raises(ValueError, match="anomaly_train_fraction needs protocol=defects"):
        _dm(anomaly_train_fraction=1 / 3)
    with pytest.raises(ValueError, match=r"must be in \(0, 1\)"):
        AnomalyDataModule(dataset=DIGITS, protocol="defects", anomaly_train_fraction=1.0)
    with pytest.raises(ValueError, match="train_on=anomaly_train needs datamodule.anomaly_train_fraction"):
        AnomalyDataModule(dataset=DIGITS, protocol="defects", train_on="anomaly_train")
    with pytest.raises(ValueError, match="train_on must be one of"):
        AnomalyDataModule(dataset=DIGITS, protocol="defects", train_on="test")
