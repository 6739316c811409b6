"""The parsers read the official layouts (tiny copies written by anomgen.data.layouts) and fail clearly."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import pickle
import shutil
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomgen.data import (
    CIFAR10,
    CIFAR100,
    CUB,
    RECORD_KEYS,
    AnimalMNIST,
    Digits,
    Flowers102,
    Folder,
    MVTecAD,
    VisA,
    layouts,
    tiny_layout,
)
from anomgen.data import animal_mnist as animal_module
from anomgen.data.digits import load_numpy_pickle, stratified_split
from anomgen.data.flowers import FLOWER_NAMES
from anomgen.errors import DatasetError

# what tests/data/conftest.py writes
MVTEC_CATEGORIES = ("bottle", "cable")
MVTEC_DEFECTS = ("broken", "crack")
VISA_CATEGORIES = ("candle", "pcb1")


def check_record(record: dict, size: tuple[int, int]) -> None:
    assert set(record) == set(RECORD_KEYS)
    image, mask = record["image"], record["mask"]
    assert image.dtype == torch.float32 and tuple(image.shape) == (3, *size)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert mask.dtype == torch.float32 and tuple(mask.shape) == size
    assert set(torch.unique(mask).tolist()) <= {0.0, 1.0}
    assert record["source"] == "real"
    assert record["label"] in (0, 1, -1)


def copy_of(root: str, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst


def blob_contrast(record: dict) -> float:
    """Mean colour distance between the masked pixels and the rest: large when the mask marks the visible blob."""
    image, mask = record["image"], record["mask"].bool()
    inside = image[:, mask].mean(dim=1)
    outside = image[:, ~mask].mean(dim=1)
    return float((inside - outside).abs().max())


# -- MVTec AD ----------------------------------------------------------------------------------------------------------


def test_mvtec_train_split(mvtec_root):
    ds = MVTecAD(mvtec_root, split="train")
    assert len(ds) == 4 * len(MVTEC_CATEGORIES)
    assert ds.categories == list(MVTEC_CATEGORIES)
    for i in range(len(ds)):
        r = ds[i]
        check_record(r, (32, 32))
        assert r["label"] == 0 and r["defect_type"] == "good" and r["mask_path"] == ""
        assert float(r["mask"].sum()) == 0.0
        assert Path(r["image_path"]).parent == Path(mvtec_root) / r["category"] / "train" / "good"


def test_mvtec_test_split_labels_and_masks(mvtec_root):
    ds = MVTecAD(mvtec_root, category="cable", split="test")
    assert ds.categories == ["cable"]
    assert len(ds) == 2 + 3 * len(MVTEC_DEFECTS)
    counts = Counter((e.label, e.defect_type) for e in ds.entries)
    assert counts == {(0, "good"): 2, (1, "broken"): 3, (1, "crack"): 3}
    for i in range(len(ds)):
        r = ds[i]
        check_record(r, (32, 32))
        if r["label"] == 0:
            assert r["mask_path"] == "" and float(r["mask"].sum()) == 0.0
            continue
        image_path, mask_path = Path(r["image_path"]), Path(r["mask_path"])
        assert image_path.parent.name == r["defect_type"]
        gt = Path(mvtec_root) / "cable" / "ground_truth" / r["defect_type"]
        assert mask_path == gt / f"{image_path.stem}_mask.png"
        assert float(r["mask"].sum()) > 0
        # the MVTec mask file holds 0 / 255; the record holds 0 / 1, exactly where the file is > 0
        raw = np.asarray(Image.open(mask_path))
        assert set(np.unique(raw).tolist()) == {0, 255}
        assert torch.equal(r["mask"], torch.from_numpy((raw > 0).astype(np.float32)))
        assert blob_contrast(r) > 0.25


def test_mvtec_all_categories_and_filter(mvtec_root):
    assert MVTecAD(mvtec_root, split="test").categories == list(MVTEC_CATEGORIES)
    only = MVTecAD(mvtec_root, category="bottle", split="test")
    assert {e.category for e in only.entries} == {"bottle"}


def test_mvtec_image_size_resizes_image_and_mask(mvtec_root):
    ds = MVTecAD(mvtec_root, category="bottle", split="test", image_size=16)
    anomalous = [i for i, e in enumerate(ds.entries) if e.label == 1]
    r = ds[anomalous[0]]
    check_record(r, (16, 16))
    assert float(r["mask"].sum()) > 0
    r = MVTecAD(mvtec_root, category="bottle", split="test", image_size=(24, 20))[anomalous[0]]
    check_record(r, (24, 20))


def test_mvtec_masks_pair_by_stem_not_by_sorted_position(tmp_path):
    root = Path(layouts.write_mvtec(tmp_path / "m", defects=("crack",), n_per_defect=1))
    crack, gt = root / "bottle" / "test" / "crack", root / "bottle" / "ground_truth" / "crack"
    shutil.rmtree(crack), shutil.rmtree(gt)
    crack.mkdir(), gt.mkdir()
    # "a.png" < "a_b.png" but "a_b_mask.png" < "a_mask.png": pairing by sorted position would swap the masks
    assert sorted(["a.png", "a_b.png"]) == ["a.png", "a_b.png"]
    assert sorted(["a_mask.png", "a_b_mask.png"]) == ["a_b_mask.png", "a_mask.png"]
    regions = {"a": (slice(0, 10), slice(0, 10)), "a_b": (slice(20, 32), slice(20, 32))}
    for stem, (ys, xs) in regions.items():
        image = np.full((32, 32, 3), 120, np.uint8)
        image[ys, xs] = 250
        mask = np.zeros((32, 32), np.uint8)
        mask[ys, xs] = 255
        Image.fromarray(image).save(crack / f"{stem}.png")
        Image.fromarray(mask).save(gt / f"{stem}_mask.png")
    ds = MVTecAD(root, split="test")
    by_stem = {Path(e.image_path).stem: i for i, e in enumerate(ds.entries) if e.label == 1}
    assert set(by_stem) == {"a", "a_b"}
    for stem, (ys, xs) in regions.items():
        r = ds[by_stem[stem]]
        assert Path(r["mask_path"]).name == f"{stem}_mask.png"
        expected = torch.zeros(32, 32)
        expected[ys, xs] = 1
        assert torch.equal(r["mask"], expected)
        assert torch.all(r["image"][:, r["mask"].bool()] > 0.9)


def test_mvtec_anomalous_image_without_mask_is_an_error(mvtec_root, tmp_path):
    root = copy_of(mvtec_root, tmp_path)
    (root / "bottle" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DatasetError) as err:
        MVTecAD(root, category="bottle", split="test")
    assert str(root / "bottle" / "test" / "crack" / "001.png") in str(err.value)
    assert "001_mask.png" in str(err.value)
    MVTecAD(root, category="bottle", split="train")  # the train split has no masks to miss
    MVTecAD(root, category="cable", split="test")  # nor has the other category


def test_mvtec_missing_root_shows_layout(tmp_path):
    with pytest.raises(DatasetError) as err:
        MVTecAD(tmp_path / "nowhere")
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and "expected layout" in msg
    assert "ground_truth/<defect>" in msg and "train/good" in msg


def test_mvtec_root_without_official_category(tmp_path):
    layouts.write_mvtec(tmp_path, categories=("widget",))
    with pytest.raises(DatasetError, match="no category folder") as err:
        MVTecAD(tmp_path)
    assert "expected layout" in str(err.value)


def test_mvtec_unknown_category_lists_valid_ones(mvtec_root):
    with pytest.raises(DatasetError) as err:
        MVTecAD(mvtec_root, category="bottel")
    assert "'bottel'" in str(err.value) and "valid categories: bottle, cable" in str(err.value)


def test_mvtec_official_category_absent_from_disk(mvtec_root):
    with pytest.raises(DatasetError) as err:
        MVTecAD(mvtec_root, category="zipper")
    assert str(Path(mvtec_root) / "zipper") in str(err.value) and "expected layout" in str(err.value)


def test_mvtec_ignores_non_official_folders(mvtec_root, tmp_path):
    root = copy_of(mvtec_root, tmp_path)
    layouts.write_mvtec(root, categories=("widget",))
    assert MVTecAD(root, split="train").categories == list(MVTEC_CATEGORIES)
    assert Folder(root, split="train").categories == sorted([*MVTEC_CATEGORIES, "widget"])


def test_mvtec_unknown_split_lists_valid_ones(mvtec_root):
    with pytest.raises(DatasetError, match=r"unknown split 'val'; valid splits: train, test"):
        MVTecAD(mvtec_root, split="val")


def test_mvtec_missing_train_folder(mvtec_root, tmp_path):
    root = copy_of(mvtec_root, tmp_path)
    shutil.rmtree(root / "cable" / "train")
    with pytest.raises(DatasetError) as err:
        MVTecAD(root, split="train")
    assert str(root / "cable" / "train" / "good") in str(err.value) and "expected layout" in str(err.value)


def test_corrupt_image_names_the_file(mvtec_root, tmp_path):
    root = copy_of(mvtec_root, tmp_path)
    bad = root / "bottle" / "train" / "good" / "002.png"
    bad.write_bytes(b"this is not a png")
    ds = MVTecAD(root, category="bottle", split="train")
    ds[0]  # the others still load
    index = [e.image_path for e in ds.entries].index(str(bad))
    with pytest.raises(DatasetError, match="002.png") as err:
        ds[index]
    assert str(bad) in str(err.value)


def test_mask_of_another_size_names_both_files(mvtec_root, tmp_path):
    root = copy_of(mvtec_root, tmp_path)
    mask_path = root / "bottle" / "ground_truth" / "broken" / "000_mask.png"
    Image.fromarray(np.full((20, 24), 255, np.uint8)).save(mask_path)
    ds = MVTecAD(root, category="bottle", split="test")
    index = [e.mask_path for e in ds.entries].index(str(mask_path))
    with pytest.raises(DatasetError) as err:
        ds[index]
    msg = str(err.value)
    assert str(mask_path) in msg and str(root / "bottle" / "test" / "broken" / "000.png") in msg
    assert "(20, 24)" in msg and "(32, 32)" in msg


# -- Folder ------------------------------------------------------------------------------------------------------------


def test_folder_reads_any_category_and_jpeg(folder_root):
    train = Folder(folder_root, split="train")
    assert train.categories == ["gadget", "widget"]
    assert len(train) == 8 and all(e.image_path.endswith(".jpg") for e in train.entries)
    test = Folder(folder_root, category="widget", split="test")
    assert Counter(e.defect_type for e in test.entries) == {"good": 2, "scratch": 2, "stain": 2}
    for i in range(len(test)):
        r = test[i]
        check_record(r, (32, 32))
        assert (r["label"] == 1) == (float(r["mask"].sum()) > 0)
        if r["label"] == 1:
            assert blob_contrast(r) > 0.25


def test_folder_accepts_the_usual_extensions_and_skips_other_files(folder_root, tmp_path):
    root = copy_of(folder_root, tmp_path)
    good = root / "widget" / "train" / "good"
    image = np.asarray(Image.open(good / "000.jpg"))
    for name in ("x.png", "y.jpeg", "z.BMP", "w.tif", "v.tiff"):
        Image.fromarray(image).save(good / name)
    (good / "notes.txt").write_text("not an image")
    ds = Folder(root, category="widget", split="train")
    names = sorted(Path(e.image_path).name for e in ds.entries)
    assert names == sorted(["000.jpg", "001.jpg", "002.jpg", "003.jpg", "x.png", "y.jpeg", "z.BMP", "w.tif", "v.tiff"])
    for i in range(len(ds)):
        check_record(ds[i], (32, 32))


def test_folder_masks_required_unless_told_otherwise(folder_root, tmp_path):
    root = copy_of(folder_root, tmp_path)
    shutil.rmtree(root / "widget" / "ground_truth" / "stain")
    with pytest.raises(DatasetError) as err:
        Folder(root, category="widget", split="test")
    assert str(root / "widget" / "test" / "stain" / "000.jpg") in str(err.value)
    ds = Folder(root, category="widget", split="test", masks_required=False)
    stains = [i for i, e in enumerate(ds.entries) if e.defect_type == "stain"]
    assert len(stains) == 2
    r = ds[stains[0]]
    assert r["label"] == 1 and r["mask_path"] == "" and float(r["mask"].sum()) == 0.0
    scratches = [i for i, e in enumerate(ds.entries) if e.defect_type == "scratch"]
    assert all(ds.entries[i].mask_path for i in scratches)


def test_folder_unknown_category_and_missing_root(folder_root, tmp_path):
    with pytest.raises(DatasetError, match="valid categories: gadget, widget"):
        Folder(folder_root, category="gizmo")
    with pytest.raises(DatasetError, match="expected layout"):
        Folder(tmp_path / "missing")


# -- VisA --------------------------------------------------------------------------------------------------------------


def test_visa_counts_labels_and_paths(visa_root):
    train = VisA(visa_root, split="train")
    assert train.categories == list(VISA_CATEGORIES)
    assert len(train) == 4 * len(VISA_CATEGORIES)
    assert all(e.label == 0 and e.defect_type == "good" and not e.mask_path for e in train.entries)
    test = VisA(visa_root, category="pcb1", split="test")
    assert Counter((e.label, e.defect_type) for e in test.entries) == {(0, "good"): 2, (1, "anomaly"): 3}
    with open(Path(visa_root) / "split_csv" / "1cls.csv") as f:
        listed = {str(Path(visa_root) / row["image"]) for row in csv.DictReader(f)}
    for e in train.entries + test.entries:  # read in place: every path is one the split file lists, under root
        assert e.image_path in listed


def test_visa_masks_with_small_integers_are_binarised(visa_root):
    ds = VisA(visa_root, split="test")
    raw_values = set()
    for i, e in enumerate(ds.entries):
        r = ds[i]
        check_record(r, (32, 32))
        if e.label == 0:
            assert r["mask_path"] == "" and float(r["mask"].sum()) == 0.0
            continue
        raw = np.asarray(Image.open(e.mask_path))
        raw_values |= set(np.unique(raw).tolist())
        assert raw.max() <= 2  # small integers, not 255
        assert torch.equal(r["mask"], torch.from_numpy((raw > 0).astype(np.float32)))
        assert float(r["mask"].sum()) > 0
        assert blob_contrast(r) > 0.25
    assert raw_values == {0, 1, 2}


def _rewrite_csv(root: Path, edit) -> None:
    path = root / "split_csv" / "1cls.csv"
    with open(path) as f:
        rows = list(csv.reader(f))
    rows = edit(rows)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_visa_anomaly_without_mask_names_the_image(visa_root, tmp_path):
    root = copy_of(visa_root, tmp_path)
    victim = {}

    def drop_mask(rows):
        for row in rows[1:]:
            if row[2] == "anomaly":
                row[4] = ""
                victim["image"] = row[3]
                break
        return rows

    _rewrite_csv(root, drop_mask)
    with pytest.raises(DatasetError) as err:
        VisA(root, split="test")
    assert str(root / victim["image"]) in str(err.value) and "no mask" in str(err.value)
    VisA(root, split="train")  # the train split does not hold that row


def test_visa_bad_label_and_missing_columns(visa_root, tmp_path):
    root = copy_of(visa_root, tmp_path)
    _rewrite_csv(root, lambda rows: [rows[0], [*rows[1][:2], "weird", *rows[1][3:]], *rows[2:]])
    with pytest.raises(DatasetError, match=r"line 2: label 'weird' is not normal/anomaly"):
        VisA(root)
    _rewrite_csv(root, lambda rows: [[c for c in row[:4]] for row in rows])
    with pytest.raises(DatasetError, match="lacks column"):
        VisA(root)


def test_visa_missing_split_file_shows_layout(visa_root, tmp_path):
    root = copy_of(visa_root, tmp_path)
    (root / "split_csv" / "1cls.csv").unlink()
    with pytest.raises(DatasetError) as err:
        VisA(root)
    assert "1cls.csv" in str(err.value) and "object,split,label,image,mask" in str(err.value)


def test_visa_image_listed_but_absent(visa_root, tmp_path):
    root = copy_of(visa_root, tmp_path)
    missing = root / "candle" / "Data" / "Images" / "Normal" / "0001.JPG"
    missing.unlink()
    with pytest.raises(DatasetError) as err:
        VisA(root, category="candle", split="train")
    assert str(missing) in str(err.value)


def test_visa_unknown_category_and_split(visa_root):
    with pytest.raises(DatasetError, match="valid categories: candle, pcb1"):
        VisA(visa_root, category="pcb9")
    with pytest.raises(DatasetError, match="valid splits: train, test"):
        VisA(visa_root, split="validation")


# -- CUB-200-2011 ------------------------------------------------------------------------------------------------------


def test_cub_splits_classes_and_records(cub_root):
    train, test = CUB(cub_root, split="train"), CUB(cub_root, split="test")
    assert len(train) == 6 and len(test) == 6
    assert set(e.image_path for e in train.entries).isdisjoint(e.image_path for e in test.entries)
    assert train.categories == list(layouts.CUB_CLASSES)
    for e in train.entries:
        assert e.label == -1 and e.defect_type == e.category
        assert Path(e.image_path).parent.name == e.category
    r = train[0]
    check_record(r, (32, 32))
    assert r["label"] == -1 and r["category"] == "001.Black_footed_Albatross"
    # the split follows train_test_split.txt: the first two images of each class are training images
    ids = dict(line.split() for line in (Path(cub_root) / "train_test_split.txt").read_text().split("\n") if line)
    paths = dict(line.split() for line in (Path(cub_root) / "images.txt").read_text().split("\n") if line)
    expected_train = {str(Path(cub_root) / "images" / paths[i]) for i, flag in ids.items() if flag == "1"}
    assert {e.image_path for e in train.entries} == expected_train


def test_cub_category_filter(cub_root):
    ds = CUB(cub_root, category="002.Laysan_Albatross", split="test")
    assert len(ds) == 2 and ds.categories == ["002.Laysan_Albatross"]
    with pytest.raises(DatasetError, match="valid categories: 001.Black_footed_Albatross, 002.Laysan_Albatross"):
        CUB(cub_root, category="Laysan_Albatross")


def test_cub_missing_index_file_shows_layout(cub_root, tmp_path):
    root = copy_of(cub_root, tmp_path)
    (root / "classes.txt").unlink()
    with pytest.raises(DatasetError) as err:
        CUB(root)
    assert str(root / "classes.txt") in str(err.value) and "image_class_labels.txt" in str(err.value)


def test_cub_inconsistent_index_and_missing_image(cub_root, tmp_path):
    root = copy_of(cub_root, tmp_path)
    lines = (root / "image_class_labels.txt").read_text().splitlines()
    (root / "image_class_labels.txt").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(DatasetError, match="image id 1 .* is missing from image_class_labels.txt"):
        CUB(root)
    (root / "image_class_labels.txt").write_text("\n".join(lines) + "\n")
    first = root / "images" / (root / "images.txt").read_text().split()[1]
    first.unlink()
    with pytest.raises(DatasetError) as err:
        CUB(root, split="train")
    assert str(first) in str(err.value)


def test_cub_unknown_split(cub_root):
    with pytest.raises(DatasetError, match="valid splits: train, test"):
        CUB(cub_root, split="val")


# -- Flowers-102 -------------------------------------------------------------------------------------------------------


def test_flower_names():
    assert len(FLOWER_NAMES) == 102 and len(set(FLOWER_NAMES)) == 102
    assert FLOWER_NAMES[0] == "pink primrose" and FLOWER_NAMES[-1] == "blackberry lily"


def test_flowers_splits_and_categories(flowers_root):
    sizes = {s: len(Flowers102(flowers_root, split=s)) for s in ("train", "val", "test")}
    assert sizes == {"train": 6, "val": 3, "test": 3}
    from scipy.io import loadmat

    labels = loadmat(str(Path(flowers_root) / "imagelabels.mat"))["labels"].reshape(-1).astype(int)
    train = Flowers102(flowers_root, split="train")
    assert set(train.categories) == set(FLOWER_NAMES[:3])
    for e in train.entries:
        number = int(Path(e.image_path).stem.split("_")[1])
        assert e.category == FLOWER_NAMES[labels[number - 1] - 1]
        assert e.label == -1 and e.defect_type == e.category
    all_paths = [e.image_path for s in ("train", "val", "test") for e in Flowers102(flowers_root, split=s).entries]
    assert len(all_paths) == len(set(all_paths)) == 12
    check_record(train[0], (32, 32))
    ds = Flowers102(flowers_root, category="canterbury bells", split="train")
    assert len(ds) == 2 and ds.categories == ["canterbury bells"]


def test_flowers_errors(flowers_root, tmp_path):
    with pytest.raises(DatasetError, match="valid splits: train, val, test"):
        Flowers102(flowers_root, split="valid")
    with pytest.raises(DatasetError, match="'rose petal'; valid categories: pink primrose, hard-leaved"):
        Flowers102(flowers_root, category="rose petal")
    root = copy_of(flowers_root, tmp_path)
    (root / "setid.mat").unlink()
    with pytest.raises(DatasetError) as err:
        Flowers102(root)
    assert str(root / "setid.mat") in str(err.value) and "trnid" in str(err.value)


def test_flowers_label_out_of_range(flowers_root, tmp_path):
    from scipy.io import savemat

    root = copy_of(flowers_root, tmp_path)
    savemat(str(root / "imagelabels.mat"), {"labels": np.array([[1, 2, 103] + [1] * 9], dtype=np.float64)})
    with pytest.raises(DatasetError, match="label 103, outside 1..102"):
        Flowers102(root)


# -- CIFAR -------------------------------------------------------------------------------------------------------------


def test_cifar10_reads_the_python_layout(cifar10_root):
    train, test = CIFAR10(cifar10_root, split="train"), CIFAR10(cifar10_root, split="test")
    assert len(train) == 20 and len(test) == 10
    assert sorted(train.categories) == sorted(layouts.CIFAR10_CLASSES)
    assert Counter(e.category for e in train.entries) == {c: 2 for c in layouts.CIFAR10_CLASSES}
    assert train.entries[0].image_path == "cifar10-train:00000"
    assert test.entries[3].image_path == "cifar10-test:00003"
    # pixels: the record is the batch row (channel-major 3×32×32) / 255
    with open(Path(cifar10_root) / "cifar-10-batches-py" / "test_batch", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    for i in (0, 7):
        r = test[i]
        check_record(r, (32, 32))
        assert r["label"] == -1 and r["category"] == layouts.CIFAR10_CLASSES[batch["labels"][i]]
        expected = torch.from_numpy(batch["data"][i].reshape(3, 32, 32).astype(np.float32) / 255.0)
        assert torch.allclose(r["image"], expected)


def test_cifar10_category_and_errors(cifar10_root, tmp_path):
    cats = CIFAR10(cifar10_root, category="cat", split="train")
    assert len(cats) == 2 and cats.categories == ["cat"]
    with pytest.raises(DatasetError, match="valid categories: .*airplane"):
        CIFAR10(cifar10_root, category="kitten")
    with pytest.raises(DatasetError, match="valid splits: train, test"):
        CIFAR10(cifar10_root, split="val")
    with pytest.raises(DatasetError) as err:
        CIFAR10(tmp_path / "nothing")
    assert "cifar-10-batches-py" in str(err.value) and "data_batch_1" in str(err.value)
    root = copy_of(cifar10_root, tmp_path)
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DatasetError, match="data_batch_3"):
        CIFAR10(root)


def test_cifar_refuses_pickles_that_are_not_plain_arrays(cifar10_root, tmp_path):
    root = copy_of(cifar10_root, tmp_path)
    with open(root / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump(OrderedDict(data=1), f, protocol=2)
    with pytest.raises(DatasetError, match="refusing to load collections.OrderedDict") as err:
        CIFAR10(root, split="test")
    assert "test_batch" in str(err.value)


def test_cifar100_fine_and_coarse(cifar100_root):
    fine = CIFAR100(cifar100_root, split="train")
    assert len(fine) == 100 and len(fine.categories) == 100
    coarse = CIFAR100(cifar100_root, split="test", labels="coarse")
    assert Counter(e.category for e in coarse.entries) == {f"coarse_{j:02d}": 5 for j in range(20)}
    one = CIFAR100(cifar100_root, category="coarse_03", split="test", labels="coarse")
    assert len(one) == 5
    check_record(one[0], (32, 32))
    with pytest.raises(DatasetError, match="'fine' or 'coarse'"):
        CIFAR100(cifar100_root, labels="super")
    with pytest.raises(DatasetError, match="cifar-100-python"):
        CIFAR100(Path(cifar100_root) / "nope")


def test_numpy_unpickler_reads_arrays_and_scalars(tmp_path):
    obj = {"a": np.arange(6, dtype=np.int16).reshape(2, 3), "s": np.float32(1.5), "l": [1, "x", b"y"]}
    for protocol in (2, 4):
        path = tmp_path / f"p{protocol}.pkl"
        path.write_bytes(pickle.dumps(obj, protocol=protocol))
        back = load_numpy_pickle(path, "test")
        assert np.array_equal(back["a"], obj["a"]) and back["a"].dtype == np.int16
        assert back["s"] == np.float32(1.5) and back["l"] == [1, "x", b"y"]


# -- shipped sets: scikit-learn digits, Animal-MNIST ------------------------------------------------------------------


def test_stratified_split_is_deterministic_disjoint_and_stratified():
    ids = np.repeat(np.arange(4), [10, 20, 3, 1])
    train, test = stratified_split(ids, 0.3, seed=0)
    assert np.array_equal(np.sort(np.concatenate([train, test])), np.arange(ids.size))
    assert not set(train) & set(test)
    assert Counter(ids[test].tolist()) == {0: 3, 1: 6, 2: 1}  # a class of one stays in train
    again = stratified_split(ids, 0.3, seed=0)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], test)
    other = stratified_split(ids, 0.3, seed=1)
    assert not np.array_equal(other[1], test)
    with pytest.raises(ValueError):
        stratified_split(ids, 1.0)


def test_digits_shapes_classes_and_pixels():
    from sklearn.datasets import load_digits

    ds = Digits(split="all")
    assert len(ds) == 1797
    assert ds.categories == [str(d) for d in range(10)]
    r = ds[42]
    check_record(r, (8, 8))
    assert r["image_path"] == "sklearn-digits:00042" and r["label"] == -1
    assert r["category"] == r["defect_type"] == str(load_digits().target[42])
    expected = np.rint(load_digits().images[42] * 255 / 16) / 255
    assert torch.allclose(r["image"][0].double(), torch.from_numpy(expected), atol=1e-6)
    assert torch.equal(r["image"][0], r["image"][1]) and torch.equal(r["image"][0], r["image"][2])
    assert float(r["image"].max()) <= 1.0


def test_digits_split_is_deterministic_disjoint_and_covering():
    train, test = Digits(split="train"), Digits(split="test")
    train_ids = [e.image_path for e in train.entries]
    test_ids = [e.image_path for e in test.entries]
    assert not set(train_ids) & set(test_ids)
    assert len(train_ids) + len(test_ids) == 1797
    assert 0.28 < len(test_ids) / 1797 < 0.32
    assert [e.image_path for e in Digits(split="test").entries] == test_ids
    assert [e.image_path for e in Digits(split="test", split_seed=1).entries] != test_ids
    assert len(Digits(split="test", test_fraction=0.5)) > len(test)
    # filtering to a class does not change which of its images are in test
    threes = Digits(category="3", split="test")
    assert [e.image_path for e in threes.entries] == [e.image_path for e in test.entries if e.category == "3"]
    assert len(Digits(category=3, split="test")) == len(threes)


def test_digits_bad_arguments():
    with pytest.raises(DatasetError, match=r"valid categories: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9"):
        Digits(category="ten")
    with pytest.raises(DatasetError, match="valid splits: train, test, all"):
        Digits(split="val")


def test_animal_mnist_classes_and_split():
    all_ = AnimalMNIST(split="all")
    assert len(all_) == 10000
    assert all_.categories == list(animal_module.ANIMAL_CLASSES)
    assert Counter(e.category for e in all_.entries) == {c: 1000 for c in animal_module.ANIMAL_CLASSES}
    r = all_[1234]
    check_record(r, (28, 28))
    assert r["image_path"] == "animal-mnist:01234" and r["label"] == -1
    assert torch.equal(r["image"][0], r["image"][2])
    train, test = AnimalMNIST(split="train"), AnimalMNIST(split="test")
    assert Counter(e.category for e in test.entries) == {c: 300 for c in animal_module.ANIMAL_CLASSES}
    assert len(train) == 7000
    assert not {e.image_path for e in train.entries} & {e.image_path for e in test.entries}
    assert [e.image_path for e in AnimalMNIST(split="test").entries] == [e.image_path for e in test.entries]
    zebras = AnimalMNIST(category="Zebra", split="train", image_size=32)
    assert len(zebras) == 700 and zebras.categories == ["Zebra"]
    check_record(zebras[0], (32, 32))


def test_animal_mnist_array_format_and_cache():
    images, labels = animal_module.load_animal_mnist(str(animal_module.animal_mnist_dir()))
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert images.max() == 255 and images.min() == 0
    before = animal_module.load_animal_mnist.cache_info().hits
    AnimalMNIST(split="test")
    assert animal_module.load_animal_mnist.cache_info().hits == before + 1


def test_animal_mnist_missing_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "animal_mnist" else real_find_spec(name, *a)
    )
    with pytest.raises(DatasetError, match=r"pip install --no-deps animal-mnist"):
        AnimalMNIST()


def test_animal_mnist_bad_arguments():
    with pytest.raises(DatasetError, match="valid categories: Bear, Bird, Cat, Cow, Dog, Elephant"):
        AnimalMNIST(category="Lion")
    with pytest.raises(DatasetError, match="valid splits: train, test, all"):
        AnimalMNIST(split="validation")


# -- the tiny layouts themselves --------------------------------------------------------------------------------


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("name", ["mvtec", "visa", "cub", "flowers", "cifar10", "folder"])
def test_tiny_layouts_are_deterministic(name, tmp_path):
    first = Path(tiny_layout(name, tmp_path / "a"))
    second = Path(tiny_layout(name, tmp_path / "b"))
    assert _digest(first) == _digest(second) and len(_digest(first)) > 3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_tiny_layout_reuses_a_finished_root_and_rejects_unknown_names(tmp_path):
    root = Path(tiny_layout("mvtec", tmp_path / "m"))
    assert len(MVTecAD(root, split="test")) == 2 + 2 * 2
    extra = root / "bottle" / "train" / "good" / "999.png"
    shutil.copy(root / "bottle" / "train" / "good" / "000.png", extra)
    assert tiny_layout("mvtec", root) == str(root)
    assert extra.exists() and len(MVTecAD(root)) == 5  # reused, not rewritten
    with pytest.raises(ValueError, match="unknown tiny layout 'imagenet'"):
        tiny_layout("imagenet", tmp_path / "x")


def test_tiny_layout_writes_into_an_existing_empty_folder(tmp_path):
    (tmp_path / "v").mkdir()
    root = tiny_layout("visa", tmp_path / "v")
    assert len(VisA(root, split="test")) > 0


@pytest.mark.parametrize("variant", ["cifar10", "cifar100"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar_agrees_with_torchvisions_parser(tmp_path, variant, split):
    """Our restricted-unpickler parser reads the same images and classes as torchvision's CIFAR parser.

    torchvision checks each file's md5 against the official one, which tiny copies cannot pass; the oracle below
    skips only those checks (in this test) and parses the files with torchvision's own code.
    """
    import torchvision

    from anomgen.data import CIFAR10, CIFAR100
    from anomgen.data.layouts import write_cifar

    root = write_cifar(tmp_path, variant=variant)
    base = torchvision.datasets.CIFAR10 if variant == "cifar10" else torchvision.datasets.CIFAR100
    unchecked = {"_check_integrity": lambda self: True, "meta": {**base.meta, "md5": None}}
    oracle_cls = type("UncheckedCIFAR", (base,), unchecked)
    oracle = oracle_cls(root, train=split == "train", download=False)
    ours = (CIFAR10 if variant == "cifar10" else CIFAR100)(root, split=split)
    assert len(ours) == len(oracle)
    for k in range(len(ours)):
        record = ours[k]
        expected = torch.from_numpy(oracle.data[k]).permute(2, 0, 1).float() / 255
        assert torch.allclose(record["image"], expected)
        assert record["category"] == oracle.classes[oracle.targets[k]]
