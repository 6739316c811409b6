"""Tiny copies of the official on-disk layouts, with random but valid content.

The real benchmarks cannot be downloaded on the development machines; these writers build small folders that the
parsers read exactly as they read the real ones. They are used by the tests and by the ``debug=tiny`` profile
(:func:`tiny_layout`). Every writer is deterministic (seeded) and returns the root it wrote as a string.

Normal images are smooth coloured textures with a little noise, one base colour per category / class. Anomalous
images carry a visible blob of a contrasting colour, and their mask marks exactly the blob (255 in MVTec-style
masks; the small integers 1 and 2 in VisA masks, as in the real VisA).
"""

from __future__ import annotations

import csv
import pickle
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from anomgen.files import atomic_dir

CUB_CLASSES = ("001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MARKER = ".anomgen-tiny-layout"


# -- pixels -------------------------------------------------------------------------------------------------------


def _base_color(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(60, 196, size=3).astype(np.float64)


def normal_image(rng: np.random.Generator, size: int, color: np.ndarray) -> np.ndarray:
    """A smooth texture around ``color`` (uint8 size×size×3): two low-frequency waves plus mild noise."""
    yy, xx = np.mgrid[0:size, 0:size] / max(size, 1)
    fx, fy, phase = rng.uniform(1.0, 3.0), rng.uniform(1.0, 3.0), rng.uniform(0, 2 * np.pi)
    wave = 20.0 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
    noise = rng.normal(0.0, 6.0, size=(size, size, 3))
    return np.clip(color[None, None, :] + wave[..., None] + noise, 0, 255).astype(np.uint8)


def blob_mask(rng: np.random.Generator, size: int, avoid: np.ndarray | None = None) -> np.ndarray:
    """A filled ellipse (bool size×size) of radius size/8 .. size/4, not overlapping ``avoid`` when possible."""
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(20):
        ry, rx = rng.uniform(size / 8, size / 4, size=2)
        cy, cx = rng.uniform(ry, size - ry), rng.uniform(rx, size - rx)
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        if blob.any() and (avoid is None or not (blob & avoid).any()):
            return blob
    return blob


def paint(image: np.ndarray, region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paint ``region`` of ``image`` in a colour far from the image's mean colour (a visible defect)."""
    out = image.copy()
    mean = image.reshape(-1, 3).mean(axis=0)
    color = np.where(mean > 127, 20.0, 235.0)
    out[region] = np.clip(color + rng.normal(0.0, 4.0, size=(int(region.sum()), 3)), 0, 255).astype(np.uint8)
    return out


def _save(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, quality=95)
    else:
        image.save(path)


# -- MVTec AD and Folder ----------------------------------------------------------------------------------------


def write_mvtec(
    root: str | Path,
    categories: Sequence[str] = ("bottle",),
    n_train: int = 4,
    n_test_good: int = 2,
    defects: Sequence[str] = ("broken", "crack"),
    n_per_defect: int = 2,
    size: int = 32,
    seed: int = 0,
    ext: str = ".png",
) -> str:
    """Write ``<root>/<category>/{train/good, test/good, test/<defect>, ground_truth/<defect>}`` (MVTec AD).

    Images are ``000<ext>``, ``001<ext>`` …; each anomalous image ``test/<defect>/<stem><ext>`` gets the mask
    ``ground_truth/<defect>/<stem>_mask.png`` (0 / 255, L mode) of its blob.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    for category in categories:
        color = _base_color(rng)
        cat = root / category
        for i in range(n_train):
            _save(normal_image(rng, size, color), cat / "train" / "good" / f"{i:03d}{ext}")
        for i in range(n_test_good):
            _save(normal_image(rng, size, color), cat / "test" / "good" / f"{i:03d}{ext}")
        for defect in defects:
            for i in range(n_per_defect):
                region = blob_mask(rng, size)
                _save(paint(normal_image(rng, size, color), region, rng), cat / "test" / defect / f"{i:03d}{ext}")
                _save(region.astype(np.uint8) * 255, cat / "ground_truth" / defect / f"{i:03d}_mask.png")
    return str(root)


def write_folder(
    root: str | Path,
    categories: Sequence[str] = ("widget",),
    n_train: int = 4,
    n_test_good: int = 2,
    defects: Sequence[str] = ("scratch", "stain"),
    n_per_defect: int = 2,
    size: int = 32,
    seed: int = 0,
    ext: str = ".jpg",
) -> str:
    """A user's own data in the MVTec-style layout (any category names, JPEG images, PNG masks)."""
    return write_mvtec(root, categories, n_train, n_test_good, defects, n_per_defect, size, seed, ext)


# -- VisA ----------------------------------------------------------------------------------------------------------


def write_visa(
    root: str | Path,
    categories: Sequence[str] = ("candle", "pcb1"),
    n_train: int = 4,
    n_test_good: int = 2,
    n_anomaly: int = 3,
    size: int = 32,
    seed: int = 0,
) -> str:
    """Write ``<root>/<object>/Data/{Images/Normal, Images/Anomaly, Masks/Anomaly}`` and ``split_csv/1cls.csv``.

    Images are JPEG (``0000.JPG`` normals, ``000.JPG`` anomalies), masks PNG in L mode holding 0 for the
    background, 1 for the first blob and, on every other anomaly, 2 for a second blob (as real VisA masks hold
    small integers, not 255).
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    for obj in categories:
        color = _base_color(rng)
        data = Path(obj) / "Data"
        for i in range(n_train + n_test_good):
            rel = data / "Images" / "Normal" / f"{i:04d}.JPG"
            _save(normal_image(rng, size, color), root / rel)
            rows.append((obj, "train" if i < n_train else "test", "normal", rel.as_posix(), ""))
        for i in range(n_anomaly):
            first = blob_mask(rng, size)
            mask = first.astype(np.uint8)
            region = first
            if i % 2 == 1:
                second = blob_mask(rng, size, avoid=first)
                mask[second & ~first] = 2
                region = first | second
            rel_img = data / "Images" / "Anomaly" / f"{i:03d}.JPG"
            rel_mask = data / "Masks" / "Anomaly" / f"{i:03d}.png"
            _save(paint(normal_image(rng, size, color), region, rng), root / rel_img)
            _save(mask, root / rel_mask)
            rows.append((obj, "test", "anomaly", rel_img.as_posix(), rel_mask.as_posix()))
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with open(root / "split_csv" / "1cls.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["object", "split", "label", "image", "mask"])
        writer.writerows(rows)
    return str(root)


# -- CUB-200-2011 ----------------------------------------------------------------------------------------------------


def write_cub(
    root: str | Path,
    classes: Sequence[str] = CUB_CLASSES,
    n_per_class: int = 5,
    n_train_per_class: int = 3,
    size: int = 32,
    seed: int = 0,
) -> str:
    """Write ``images.txt``, ``image_class_labels.txt``, ``train_test_split.txt``, ``classes.txt``, ``images/``.

    Image ids run from 1 in class order; the first ``n_train_per_class`` images of each class are training images.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    images, labels, split = [], [], []
    image_id = 0
    for class_id, class_name in enumerate(classes, start=1):
        color = _base_color(rng)
        short = class_name.split(".", 1)[-1]
        for k in range(n_per_class):
            image_id += 1
            rel = f"{class_name}/{short}_{k + 1:04d}_{image_id}.jpg"
            _save(normal_image(rng, size, color), root / "images" / rel)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {class_id}")
            split.append(f"{image_id} {1 if k < n_train_per_class else 0}")
    root.mkdir(parents=True, exist_ok=True)
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "classes.txt").write_text("\n".join(f"{i} {c}" for i, c in enumerate(classes, start=1)) + "\n")
    return str(root)


# -- Flowers-102 -------------------------------------------------------------------------------------------------------


def write_flowers(
    root: str | Path,
    n_classes: int = 3,
    n_train: int = 3,
    n_val: int = 1,
    n_test: int = 1,
    size: int = 32,
    seed: int = 0,
) -> str:
    """Write ``jpg/image_%05d.jpg``, ``imagelabels.mat`` (``labels`` 1×N) and ``setid.mat`` (``trnid`` …).

    Classes 1..``n_classes`` (of the 102 official labels) each get ``n_train + n_val + n_test`` images; images
    of different classes are interleaved, as in the real numbering.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    per_class = n_train + n_val + n_test
    labels = np.repeat(np.arange(1, n_classes + 1), per_class)
    labels = labels[rng.permutation(labels.size)]
    colors = {c: _base_color(rng) for c in range(1, n_classes + 1)}
    trn, val, tst = [], [], []
    for c in range(1, n_classes + 1):
        numbers = np.flatnonzero(labels == c) + 1
        trn += numbers[:n_train].tolist()
        val += numbers[n_train : n_train + n_val].tolist()
        tst += numbers[n_train + n_val :].tolist()
    for number, label in enumerate(labels.tolist(), start=1):
        _save(normal_image(rng, size, colors[label]), root / "jpg" / f"image_{number:05d}.jpg")
    _savemat(root / "imagelabels.mat", {"labels": labels.astype(np.float64)[None, :]})
    splits = {"trnid": trn, "valid": val, "tstid": tst}
    _savemat(root / "setid.mat", {k: np.asarray(sorted(v), dtype=np.uint16)[None, :] for k, v in splits.items()})
    return str(root)


def _savemat(path: Path, arrays: dict) -> None:
    """``scipy.io.savemat``, with the free-text header (which holds the creation time) made fixed."""
    from scipy.io import savemat

    savemat(str(path), arrays)
    data = bytearray(path.read_bytes())
    data[:116] = b"MATLAB 5.0 MAT-file, written by anomgen.data.layouts".ljust(116, b" ")
    path.write_bytes(bytes(data))


# -- CIFAR ------------------------------------------------------------------------------------------------------------


def _cifar_images(rng: np.random.Generator, labels: np.ndarray, colors: np.ndarray) -> np.ndarray:
    """N×3072 uint8 rows, channel-major (the CIFAR python layout)."""
    rows = [normal_image(rng, 32, colors[c]).transpose(2, 0, 1).reshape(-1) for c in labels.tolist()]
    return np.stack(rows) if rows else np.zeros((0, 3072), np.uint8)


def _dump(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the official files are protocol-2 pickles


def write_cifar(
    root: str | Path,
    variant: str = "cifar10",
    n_per_class_train: int = 4,
    n_per_class_test: int = 1,
    seed: int = 0,
) -> str:
    """Write the unpacked "python version" of CIFAR-10 (``cifar-10-batches-py``) or CIFAR-100 (``cifar-100-python``).

    CIFAR-10 gets the official class names and five training batches; CIFAR-100 gets 100 fine classes named
    ``fine_000`` … and 20 coarse classes ``coarse_00`` … (five fine classes each). Same keys as the real files.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    if variant == "cifar10":
        names = list(CIFAR10_CLASSES)
    elif variant == "cifar100":
        names = [f"fine_{i:03d}" for i in range(100)]
    else:
        raise ValueError(f"variant must be 'cifar10' or 'cifar100', got {variant!r}")
    colors = np.stack([_base_color(rng) for _ in names])
    splits = {}
    for split, n in (("train", n_per_class_train), ("test", n_per_class_test)):
        labels = np.repeat(np.arange(len(names)), n)
        labels = labels[rng.permutation(labels.size)]
        splits[split] = (labels, _cifar_images(rng, labels, colors))
    if variant == "cifar10":
        base = root / "cifar-10-batches-py"
        labels, data = splits["train"]
        for b, idx in enumerate(np.array_split(np.arange(labels.size), 5), start=1):
            _dump(_cifar10_batch(f"training batch {b} of 5", labels[idx], data[idx]), base / f"data_batch_{b}")
        labels, data = splits["test"]
        _dump(_cifar10_batch("testing batch 1 of 1", labels, data), base / "test_batch")
        _dump({"label_names": names, "num_cases_per_batch": int(np.ceil(splits["train"][0].size / 5)), "num_vis": 3072},
              base / "batches.meta")  # fmt: skip
    else:
        base = root / "cifar-100-python"
        for split in ("train", "test"):
            labels, data = splits[split]
            _dump(
                {
                    "filenames": [f"tiny_{i:05d}.png" for i in range(labels.size)],
                    "batch_label": f"{split}ing batch 1 of 1",
                    "fine_labels": labels.tolist(),
                    "coarse_labels": (labels // 5).tolist(),
                    "data": data,
                },
                base / split,
            )
        _dump({"fine_label_names": names, "coarse_label_names": [f"coarse_{j:02d}" for j in range(20)]}, base / "meta")
    return str(root)


def _cifar10_batch(batch_label: str, labels: np.ndarray, data: np.ndarray) -> dict:
    return {
        "batch_label": batch_label,
        "labels": labels.tolist(),
        "data": data,
        "filenames": [f"tiny_{i:05d}.png" for i in range(labels.size)],
    }


# -- dispatch ----------------------------------------------------------------------------------------------------------

WRITERS: dict[str, Callable[..., str]] = {
    "mvtec": write_mvtec,
    "mvtec_ad": write_mvtec,
    "visa": write_visa,
    "cub": write_cub,
    "flowers": write_flowers,
    "flowers102": write_flowers,
    "cifar10": partial(write_cifar, variant="cifar10"),
    "cifar100": partial(write_cifar, variant="cifar100"),
    "folder": write_folder,
}


def tiny_layout(name: str, root: str | Path) -> str:
    """Write the tiny layout ``name`` (mvtec, visa, cub, flowers, cifar10, cifar100, folder) at ``root``.

    Returns ``root`` as a string. A root already written by this function (it holds a marker file) is reused as
    is. A new root is written under a temporary name beside it and renamed when complete, so that concurrent
    callers (e.g. several ranks) never see a half-written layout.
    """
    if name not in WRITERS:
        raise ValueError(f"unknown tiny layout {name!r}; known: {', '.join(WRITERS)}")
    root = Path(root)
    if (root / MARKER).is_file():
        return str(root)
    if root.is_dir() and any(root.iterdir()):  # an existing, non-empty folder: write in place
        WRITERS[name](root)
        (root / MARKER).write_text(name + "\n")
        return str(root)
    with atomic_dir(root, exist_ok=True) as tmp:  # another caller may finish first: then its copy is used
        WRITERS[name](tmp)
        (tmp / MARKER).write_text(name + "\n")
    return str(root)
