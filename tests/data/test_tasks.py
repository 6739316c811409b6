"""Task protocols over parsed datasets: which samples are normal, anomalous, and used for what."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from anomgen.data import Digits, MVTecAD, layouts
from anomgen.data.tasks import (
    TaskView,
    anomalydiffusion_split,
    closest_out_class,
    k_shot,
    normal_class,
    one_vs_one,
    one_vs_one_all,
    one_vs_rest,
    per_defect_type,
    split_support,
)
from anomgen.errors import DatasetError


@pytest.fixture(scope="module")
def digits_test() -> Digits:
    return Digits(split="test")


@pytest.fixture(scope="module")
def mvtec_test(mvtec_root) -> MVTecAD:
    return MVTecAD(mvtec_root, category="bottle", split="test")


# -- multi-class protocols ---------------------------------------------------------------------------------------------


def test_normal_class_keeps_only_that_class(digits_test):
    view = normal_class(digits_test, "4")
    assert len(view) == sum(e.category == "4" for e in digits_test.entries) > 0
    assert all(e.category == "4" and e.label == 0 and e.defect_type == "good" for e in view.entries)
    r = view[0]
    assert r["label"] == 0 and r["category"] == "4" and r["defect_type"] == "good"


def test_one_vs_rest_labels(digits_test):
    view = one_vs_rest(digits_test, "3")
    assert len(view) == len(digits_test)
    n_threes = sum(e.category == "3" for e in digits_test.entries)
    assert Counter(e.label for e in view.entries) == {0: n_threes, 1: len(digits_test) - n_threes}
    for e in view.entries:
        assert (e.label == 0) == (e.category == "3")
        assert e.defect_type == ("good" if e.category == "3" else e.category)
    anomalous = next(i for i, e in enumerate(view.entries) if e.label == 1)
    record = view[anomalous]
    assert record["label"] == 1 and record["defect_type"] == record["category"] != "3"
    assert digits_test[view.indices[anomalous]]["label"] == -1  # the base set is left unlabelled


def test_one_vs_one_labels(digits_test):
    view = one_vs_one(digits_test, "1", "7")
    assert {e.category for e in view.entries} == {"1", "7"}
    assert len(view) == sum(e.category in ("1", "7") for e in digits_test.entries)
    for e in view.entries:
        assert e.label == (0 if e.category == "1" else 1)
        assert e.defect_type == ("good" if e.category == "1" else "7")
    with pytest.raises(DatasetError, match="must differ"):
        one_vs_one(digits_test, "1", "1")
    with pytest.raises(DatasetError, match="unknown out class 'x'; valid classes: ") as err:
        one_vs_one(digits_test, "1", "x")
    assert sorted(str(err.value).split("valid classes: ")[1].split(", ")) == [str(d) for d in range(10)]
    with pytest.raises(DatasetError, match="unknown normal class '11'"):
        one_vs_rest(digits_test, "11")


def test_one_vs_one_all_covers_every_out_class(digits_test):
    views = one_vs_one_all(digits_test, "0")
    assert sorted(views) == [str(d) for d in range(1, 10)]
    n_zeros = sum(e.category == "0" for e in digits_test.entries)
    for out, view in views.items():
        labels = Counter(e.label for e in view.entries)
        assert labels[0] == n_zeros
        assert labels[1] == sum(e.category == out for e in digits_test.entries)
        assert {e.category for e in view.entries} == {"0", out}


def test_closest_out_class_is_the_lowest_auroc():
    assert closest_out_class({"cat": 0.91, "dog": 0.62, "cow": 0.80}) == ("dog", 0.62)
    assert closest_out_class({"only": 1.0}) == ("only", 1.0)
    with pytest.raises(ValueError):
        closest_out_class({})


# -- defect sets -----------------------------------------------------------------------------------------------


def test_per_defect_type_on_mvtec(mvtec_test):
    views = per_defect_type(mvtec_test)
    assert sorted(views) == ["broken", "crack"]
    for defect, view in views.items():
        assert Counter((e.label, e.defect_type) for e in view.entries) == {(0, "good"): 2, (1, defect): 3}
        assert [view[i]["label"] for i in range(len(view))] == [e.label for e in view.entries]
        anomalous = next(i for i, e in enumerate(view.entries) if e.label == 1)
        assert float(view[anomalous]["mask"].sum()) > 0


def test_anomalydiffusion_split_first_third_by_id(tmp_path):
    root = layouts.write_mvtec(tmp_path, defects=("hole", "scratch"), n_per_defect=7, size=16)
    ds = MVTecAD(root, split="test")
    train, test = anomalydiffusion_split(ds)
    for view in (train, test):
        assert all(e.label == 1 for e in view.entries)  # normals go to neither side
    names = lambda view, d: sorted(Path(e.image_path).name for e in view.entries if e.defect_type == d)  # noqa: E731
    for defect in ("hole", "scratch"):  # ⌊7/3⌋ = 2 train; the reference code's overlap image (002) only tests
        assert names(train, defect) == ["000.png", "001.png"]
        assert names(test, defect) == ["002.png", "003.png", "004.png", "005.png", "006.png"]
    assert set(train.indices).isdisjoint(test.indices)
    assert sorted(train.indices + test.indices) == [i for i, e in enumerate(ds.entries) if e.label == 1]
    for n, n_train in ((3, 1), (5, 1), (6, 2), (9, 3)):  # ⌊n/3⌋ exactly, also where n/3 is a whole number
        root_n = layouts.write_mvtec(tmp_path / f"n{n}", defects=("hole",), n_per_defect=n, size=16)
        train_n, test_n = anomalydiffusion_split(MVTecAD(root_n, split="test"))
        assert (len(train_n), len(test_n)) == (n_train, n - n_train)


def test_anomalydiffusion_split_too_few_anomalies_is_one_clear_error(tmp_path):
    root = layouts.write_mvtec(tmp_path, defects=("crack", "hole"), n_per_defect=3, size=16)
    (Path(root) / "bottle" / "test" / "hole" / "002.png").unlink()  # hole: 2 images, ⌊2/3⌋ = 0 to train
    with pytest.raises(DatasetError, match=r"defect type 'hole' has 2 anomalous image\(s\).* 0 to train and 2 to "
                                           r"test.* at least 3"):
        anomalydiffusion_split(MVTecAD(root, split="test"))
    with pytest.raises(DatasetError, match="train_fraction must be in"):
        anomalydiffusion_split(MVTecAD(root, split="test"), train_fraction=1.0)


# -- support sets ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 4, 8, 16])
def test_k_shot_is_deterministic_by_seed(k):
    normals = normal_class(Digits(split="train"), "5")
    first = k_shot(normals, k, seed=3)
    assert len(first) == k and len(set(first.indices)) == k
    assert first.indices == k_shot(normals, k, seed=3).indices
    assert first.indices == k_shot(normal_class(Digits(split="train"), "5"), k, seed=3).indices
    assert all(e.label == 0 and e.category == "5" for e in first.entries)
    others = {tuple(k_shot(normals, k, seed=s).indices) for s in range(5)}
    assert len(others) > 1  # the seed matters


def test_k_shot_on_mvtec_train_and_too_many(mvtec_root):
    train = MVTecAD(mvtec_root, category="bottle", split="train")
    shot = k_shot(train, 2, seed=0)
    assert all(e.label == 0 for e in shot.entries)
    assert shot[0]["image"].shape == (3, 32, 32)
    with pytest.raises(DatasetError, match="K=5 .* has 4"):
        k_shot(train, 5)


def test_split_support_is_a_partition():
    support = k_shot(normal_class(Digits(split="train"), "2"), 16, seed=0)
    style, content, held_out = split_support(support, n_style=3, n_content=5, seed=1)
    assert (len(style), len(content), len(held_out)) == (3, 5, 8)
    parts = [set(v.indices) for v in (style, content, held_out)]
    assert parts[0].isdisjoint(parts[1]) and parts[0].isdisjoint(parts[2]) and parts[1].isdisjoint(parts[2])
    assert parts[0] | parts[1] | parts[2] == set(range(len(support)))
    # the views index the support set: their images are the support set's images
    assert style[0]["image_path"] == support[style.indices[0]]["image_path"]
    assert {e.image_path for e in held_out.entries} <= {e.image_path for e in support.entries}
    again = split_support(support, 3, 5, seed=1)
    assert [v.indices for v in again] == [style.indices, content.indices, held_out.indices]


def test_split_support_errors():
    support = k_shot(normal_class(Digits(split="train"), "2"), 4, seed=0)
    with pytest.raises(DatasetError, match="has 4 images, fewer than n_style \\+ n_content = 5"):
        split_support(support, 2, 3)
    with pytest.raises(DatasetError, match=">= 1"):
        split_support(support, 0, 2)
    style, content, held_out = split_support(support, 2, 2)
    assert len(held_out) == 0


def test_task_view_needs_a_parsed_dataset():
    with pytest.raises(TypeError, match="entries"):
        one_vs_rest([1, 2, 3], "1")
    view = TaskView(Digits(split="test"), [0, 1], labels=[1, 0], defect_types=["x", "good"])
    assert [view[i]["label"] for i in range(2)] == [1, 0] and view[0]["defect_type"] == "x"


def test_labelled_anomalies_come_from_other_classes_by_seed():
    import functools

    from anomgen.data import Digits
    from anomgen.data.tasks import labelled_anomalies, labelled_anomalies_from

    train = Digits(split="train")
    view = labelled_anomalies(train, "3", m=5, seed=1)
    assert len(view) == 5 and all(r["label"] == 1 for r in view)
    assert all(e.category != "3" for e in view.entries)
    assert [e.image_path for e in view.entries] == [e.image_path for e in labelled_anomalies(train, "3", 5, 1).entries]
    assert [e.image_path for e in view.entries] != [e.image_path for e in labelled_anomalies(train, "3", 5, 2).entries]
    test_ids = {e.image_path for e in Digits(split="test").entries}
    from_factory = labelled_anomalies_from(functools.partial(Digits), "3", m=5, seed=1)
    assert not test_ids & {e.image_path for e in from_factory.entries}
    with pytest.raises(DatasetError, match="test split"):
        labelled_anomalies_from(functools.partial(Digits), "3", m=5, split="test")
    with pytest.raises(DatasetError, match="m=100000"):
        labelled_anomalies(train, "3", m=100000)
