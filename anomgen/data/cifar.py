"""CIFAR-10 and CIFAR-100, read from the official "python version" archives (already unpacked).

The batch files are read here with :class:`~anomgen.data.digits.NumpyUnpickler`, not through
``torchvision.datasets.CIFAR10``: torchvision checks the md5 of every batch file, so it refuses any copy that is
not byte-identical to the official release (such as the tiny copies that ``anomgen.data.layouts`` writes for tests
and the ``debug=tiny`` profile), and it unpickles with an unrestricted ``pickle.load``. Reading the documented
layout directly gives one code path for the real files and the tiny copies, and never runs code from a pickle.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from anomgen.data.base import ArrayRecordDataset, ImageSize, check_category, check_split, require_dir, require_file
from anomgen.data.digits import load_numpy_pickle
from anomgen.errors import DatasetError

CIFAR10_LAYOUT = """\
<root>/
  cifar-10-batches-py/             the unpacked cifar-10-python.tar.gz
    data_batch_1 ... data_batch_5  pickled dicts: data (N×3072 uint8, channel-major 3×32×32 rows), labels (N ints)
    test_batch                     same keys
    batches.meta                   pickled dict: label_names (10 names)"""

CIFAR100_LAYOUT = """\
<root>/
  cifar-100-python/                the unpacked cifar-100-python.tar.gz
    train                          pickled dict: data (N×3072 uint8), fine_labels, coarse_labels (N ints)
    test                           same keys
    meta                           pickled dict: fine_label_names (100), coarse_label_names (20)"""

SPLITS = ("train", "test")


def _batch_arrays(batch, path: Path, label_key: str, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(batch, dict) or "data" not in batch or label_key not in batch:
        keys = ", ".join(map(str, batch)) if isinstance(batch, dict) else type(batch).__name__
        raise DatasetError(f"{dataset}: {path} should be a dict with 'data' and {label_key!r}, got {keys}")
    data = np.asarray(batch["data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64).reshape(-1)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{dataset}: {path}: 'data' should be N×3072 with N = {labels.shape[0]} labels, got {data.shape}"
        )
    return data, labels


class _CIFAR(ArrayRecordDataset):
    """Shared reader of the CIFAR python layout; subclasses name the folder, the files and the label keys."""

    folder = ""
    layout = ""
    train_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()
    meta_file = ""

    def _read(self, root: Path, split: str, label_key: str, names_key: str):
        base = require_dir(root / self.folder, self.name, self.layout)
        files = [require_file(base / f, self.name, self.layout) for f in (self.train_files + self.test_files)]
        meta_path = require_file(base / self.meta_file, self.name, self.layout)
        meta = load_numpy_pickle(meta_path, self.name, encoding="latin1")
        if not isinstance(meta, dict) or names_key not in meta:
            raise DatasetError(f"{self.name}: {meta_path} should be a dict with {names_key!r}")
        class_names = [str(n) for n in meta[names_key]]
        wanted = files[: len(self.train_files)] if split == "train" else files[len(self.train_files) :]
        parts = [
            _batch_arrays(load_numpy_pickle(p, self.name, encoding="latin1"), p, label_key, self.name) for p in wanted
        ]
        data = np.concatenate([d for d, _ in parts])
        labels = np.concatenate([lab for _, lab in parts])
        if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
            raise DatasetError(
                f"{self.name}: class ids outside 0..{len(class_names) - 1} in {', '.join(str(p) for p in wanted)}"
            )
        images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # N×H×W×3
        return images, labels, class_names

    def _setup(self, root, category, split, image_size, label_key: str, names_key: str) -> None:
        check_split(split, SPLITS, self.name)
        root = require_dir(Path(root), self.name, self.layout)
        images, labels, class_names = self._read(root, split, label_key, names_key)
        category = None if category is None else str(category)
        check_category(category, class_names, self.name)
        idx = np.arange(len(labels))
        if category is not None:
            idx = idx[labels == class_names.index(category)]
        super().__init__(images, labels, class_names, f"{self.name}-{split}", idx.tolist(), image_size)
        self.root = root
        self.split = split
        self.available_categories = class_names


class CIFAR10(_CIFAR):
    """CIFAR-10: 60,000 32×32 colour images in 10 classes (50,000 train, 10,000 test).

    Expected layout::

        <root>/cifar-10-batches-py/
          data_batch_1 ... data_batch_5  test_batch  batches.meta

    ``category`` is a class name from ``batches.meta`` (airplane, automobile, bird, cat, deer, dog, frog, horse,
    ship, truck); ``None`` keeps every class. A multi-class set: ``label`` is -1. Splits: ``train``, ``test``.
    ``image_path`` is a stable id ``cifar10-<split>:<index>``.
    """

    name = "cifar10"
    folder = "cifar-10-batches-py"
    layout = CIFAR10_LAYOUT
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    meta_file = "batches.meta"

    def __init__(
        self, root: str | Path, category: str | None = None, split: str = "train", image_size: ImageSize = None
    ) -> None:
        self._setup(root, category, split, image_size, "labels", "label_names")


class CIFAR100(_CIFAR):
    """CIFAR-100: 60,000 32×32 colour images in 100 fine classes grouped into 20 coarse super-classes.

    Expected layout::

        <root>/cifar-100-python/
          train  test  meta

    ``labels="fine"`` (default) makes the 100 fine class names the categories; ``labels="coarse"`` the 20
    super-class names (the usual CIFAR-100 one-class anomaly-detection protocol). A multi-class set: ``label`` is
    -1. Splits: ``train``, ``test``. ``image_path`` is a stable id ``cifar100-<split>:<index>``.
    """

    name = "cifar100"
    folder = "cifar-100-python"
    layout = CIFAR100_LAYOUT
    train_files = ("train",)
    test_files = ("test",)
    meta_file = "meta"

    def __init__(
        self,
        root: str | Path,
        category: str | None = None,
        split: str = "train",
        image_size: ImageSize = None,
        labels: str = "fine",
    ) -> None:
        if labels not in ("fine", "coarse"):
            raise DatasetError(f"{self.name}: labels must be 'fine' or 'coarse', got {labels!r}")
        self.label_kind = labels
        self._setup(root, category, split, image_size, f"{labels}_labels", f"{labels}_label_names")
