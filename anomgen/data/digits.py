"""Sets that ship with installed packages (no download): scikit-learn's handwritten digits.

Also the helpers that the in-memory sets share: the deterministic stratified split (these sets have no official
split) and a restricted unpickler for the numpy arrays that some datasets are distributed as.
"""

from __future__ import annotations

import gzip
import pickle
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from anomgen.data.base import ArrayRecordDataset, ImageSize, check_category, check_split
from anomgen.errors import DatasetError

SHIPPED_SPLITS = ("train", "test", "all")
DIGIT_CLASSES = tuple(str(d) for d in range(10))


# -- deterministic split --------------------------------------------------------------------------------------------


def stratified_split(class_ids: np.ndarray, test_fraction: float = 0.3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split indices ``0..N-1`` into (train, test), per class, by ``seed``: the same split on every machine.

    Each class gives ``round(n_class * test_fraction)`` images to test (at least one, and at least one left for
    train, when the class has two or more). Both index arrays are sorted.
    """
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    class_ids = np.asarray(class_ids)
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(class_ids):
        members = rng.permutation(np.flatnonzero(class_ids == c))
        n_test = int(round(len(members) * float(test_fraction)))
        if len(members) >= 2:
            n_test = min(max(n_test, 1), len(members) - 1)
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)).astype(np.int64), np.sort(np.concatenate(test)).astype(np.int64)


def select_indices(
    class_ids: np.ndarray,
    class_names: Sequence[str],
    category: str | None,
    split: str,
    split_seed: int,
    test_fraction: float,
    dataset: str,
) -> list[int]:
    """The indices of one split (``train`` / ``test`` / ``all``) of an in-memory set, filtered to ``category``.

    The split is made over the whole set first, so that a class's train / test images do not depend on whether
    the set was filtered to that class.
    """
    check_split(split, SHIPPED_SPLITS, dataset)
    check_category(category, list(class_names), dataset)
    if split == "all":
        idx = np.arange(len(class_ids))
    else:
        train, test = stratified_split(class_ids, test_fraction, split_seed)
        idx = train if split == "train" else test
    if category is not None:
        wanted = list(class_names).index(category)
        idx = idx[np.asarray(class_ids)[idx] == wanted]
    return [int(i) for i in idx]


# -- restricted unpickling of numpy arrays -------------------------------------------------------------------------


def _allowed_globals() -> dict[tuple[str, str], object]:
    import codecs

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(text, "latin1").
    allowed[("_codecs", "encode")] = codecs.encode
    return allowed


class NumpyUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, dtypes and scalars (and plain containers) and refuses anything else.

    Pickles from the internet can run arbitrary code through ``find_class``; this one admits only the globals
    that a pickled ndarray needs.
    """

    _allowed: dict[tuple[str, str], object] | None = None

    def find_class(self, module: str, name: str):
        if NumpyUnpickler._allowed is None:
            NumpyUnpickler._allowed = _allowed_globals()
        try:
            return NumpyUnpickler._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed") from None


def load_numpy_pickle(path: str | Path, dataset: str, encoding: str = "ASCII"):
    """Unpickle ``path`` (gzip'd when its name ends in ``.gz``) with :class:`NumpyUnpickler`.

    ``encoding="latin1"`` reads pickles written by Python 2 (e.g. the CIFAR batches). Any failure is a
    :class:`DatasetError` naming the file.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            return NumpyUnpickler(f, encoding=encoding).load()
    except FileNotFoundError:
        raise DatasetError(f"{dataset}: file not found: {path}") from None
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise DatasetError(f"{dataset}: cannot read {path}: {err}") from err


# -- scikit-learn digits --------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 digits as uint8 N×8×8 (0..16 scaled by 255/16, rounded) and their int64 class ids."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return images, np.asarray(bunch.target, dtype=np.int64)


class ShippedClassSet(ArrayRecordDataset):
    """A multi-class image set that ships inside an installed package (no root): subclasses say how to load it.

    There is no official split: ``train`` / ``test`` are a stratified split by ``split_seed`` with
    ``test_fraction`` of each class in test (made over the whole set before any category filter, so a class's
    images fall on the same side whether or not it is filtered); ``all`` is every image.
    """

    class_names: Sequence[str] = ()
    id_prefix = ""

    @staticmethod
    def load_arrays() -> tuple[np.ndarray, np.ndarray]:
        """(uint8 images N×H×W, class ids N)."""
        raise NotImplementedError

    def __init__(
        self,
        category: str | int | None = None,
        split: str = "train",
        image_size: ImageSize = None,
        split_seed: int = 0,
        test_fraction: float = 0.3,
    ) -> None:
        category = None if category is None else str(category)
        images, class_ids = self.load_arrays()
        idx = select_indices(class_ids, self.class_names, category, split, split_seed, test_fraction, self.name)
        super().__init__(images, class_ids, self.class_names, self.id_prefix, idx, image_size)
        self.split = split
        self.split_seed = split_seed
        self.test_fraction = test_fraction
        self.available_categories = list(self.class_names)


class Digits(ShippedClassSet):
    """scikit-learn's handwritten digits: 1,797 real 8×8 grey images, classes ``"0"`` … ``"9"``.

    Ships with scikit-learn (``sklearn.datasets.load_digits``): no root, nothing to download. Pixels 0..16 are
    scaled to 0..255 (×255/16, rounded); images are repeated to 3 channels. A multi-class set: ``label`` is -1
    and ``category`` / ``defect_type`` hold the class name. There is no official split: ``train`` / ``test`` are a
    stratified split by ``split_seed`` with ``test_fraction`` of each class in test; ``all`` is every image.
    ``image_path`` is a stable id ``sklearn-digits:<index>``.
    """

    name = "digits"
    class_names = DIGIT_CLASSES
    id_prefix = "sklearn-digits"

    load_arrays = staticmethod(load_digits_arrays)
