"""Animal-MNIST: 10,000 real 28×28 animal silhouettes in ten classes, shipped by the ``animal-mnist`` package.

The package's own loader imports tensorflow, so it is not used: the two data files are located through the
package's import spec (without running any of its code) and read with a restricted unpickler. Each file is a
gzip'd pickle of one numpy array: ``animal_data_version_3.gz`` holds uint8 10000×28×28 (white silhouettes on
black, 0..255) and ``animal_label_version_3.gz`` int64 10000 class ids 0..9, 1,000 per class.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import numpy as np

from anomgen.data.digits import ShippedClassSet, load_numpy_pickle
from anomgen.errors import DatasetError

ANIMAL_CLASSES = ("Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra")
DATA_FILE = "animal_data_version_3.gz"
LABEL_FILE = "animal_label_version_3.gz"
INSTALL_HINT = "pip install --no-deps animal-mnist"


def animal_mnist_dir() -> Path:
    """The folder that holds the package's data files (``animal_mnist/data/Animal_MNIST``)."""
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(
            f"animal_mnist: the `animal-mnist` package is not installed; install it with `{INSTALL_HINT}` "
            "(--no-deps: its own loader needs tensorflow, which anomgen does not use)"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"
    for name in (DATA_FILE, LABEL_FILE):
        if not (folder / name).is_file():
            raise DatasetError(
                f"animal_mnist: data file not found: {folder / name}; reinstall the package with `{INSTALL_HINT}`"
            )
    return folder


@lru_cache(maxsize=2)
def load_animal_mnist(folder: str) -> tuple[np.ndarray, np.ndarray]:
    """The images (uint8 N×28×28) and class ids (int64 N) from ``folder``; cached, so construction is cheap."""
    data_path, label_path = Path(folder) / DATA_FILE, Path(folder) / LABEL_FILE
    images = load_numpy_pickle(data_path, "animal_mnist")
    labels = load_numpy_pickle(label_path, "animal_mnist")
    if not isinstance(images, np.ndarray) or images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(f"animal_mnist: {data_path} should hold a uint8 N×H×W array, got {_describe(images)}")
    if not isinstance(labels, np.ndarray) or labels.shape != (images.shape[0],):
        raise DatasetError(
            f"animal_mnist: {label_path} should hold {images.shape[0]} class ids, got {_describe(labels)}"
        )
    labels = labels.astype(np.int64)
    if labels.min() < 0 or labels.max() >= len(ANIMAL_CLASSES):
        raise DatasetError(f"animal_mnist: {label_path} holds class ids outside 0..{len(ANIMAL_CLASSES) - 1}")
    return images, labels


def _describe(obj) -> str:
    if isinstance(obj, np.ndarray):
        return f"array {obj.dtype} {tuple(obj.shape)}"
    return type(obj).__name__


class AnimalMNIST(ShippedClassSet):
    """Animal-MNIST: 10,000 real 28×28 grey silhouettes, 1,000 in each of ten classes.

    Classes (``category``): Bear, Bird, Cat, Cow, Dog, Elephant, Giraffe, Horse, Sheep, Zebra, with near pairs
    (Dog–Cat, Sheep–Cow, Horse–Giraffe) that make it a hard near-distribution benchmark. Ships with the
    ``animal-mnist`` package (``pip install --no-deps animal-mnist``): no root. A multi-class set: ``label`` is -1.
    There is no official split: ``train`` / ``test`` are a stratified split by ``split_seed`` with
    ``test_fraction`` of each class in test; ``all`` is every image. ``image_path`` is ``animal-mnist:<index>``.
    """

    name = "animal_mnist"
    class_names = ANIMAL_CLASSES
    id_prefix = "animal-mnist"

    @staticmethod
    def load_arrays() -> tuple[np.ndarray, np.ndarray]:
        return load_animal_mnist(str(animal_mnist_dir()))
