"""Oxford Flowers-102 (Nilsback & Zisserman): 102 flower species, a multi-class set."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from anomgen.data.base import ImageSize, RecordDataset, check_category, check_split, require_dir, require_file
from anomgen.data.record import UNKNOWN, Entry
from anomgen.errors import DatasetError

# The class names, in label order (label 1 = "pink primrose"). The dataset's own files hold only numbers; these
# are the names in common use for its 102 labels (the same list as torchvision's ``Flowers102.classes``, where the
# 60th is written "pink-yellow dahlia?"; the question mark is dropped here).
FLOWER_NAMES = (
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea", "english marigold",
    "tiger lily", "moon orchid", "bird of paradise", "monkshood", "globe thistle",
    "snapdragon", "colt's foot", "king protea", "spear thistle", "yellow iris",
    "globe-flower", "purple coneflower", "peruvian lily", "balloon flower", "giant white arum lily",
    "fire lily", "pincushion flower", "fritillary", "red ginger", "grape hyacinth",
    "corn poppy", "prince of wales feathers", "stemless gentian", "artichoke", "sweet william",
    "carnation", "garden phlox", "love in the mist", "mexican aster", "alpine sea holly",
    "ruby-lipped cattleya", "cape flower", "great masterwort", "siam tulip", "lenten rose",
    "barbeton daisy", "daffodil", "sword lily", "poinsettia", "bolero deep blue",
    "wallflower", "marigold", "buttercup", "oxeye daisy", "common dandelion",
    "petunia", "wild pansy", "primula", "sunflower", "pelargonium",
    "bishop of llandaff", "gaura", "geranium", "orange dahlia", "pink-yellow dahlia",
    "cautleya spicata", "japanese anemone", "black-eyed susan", "silverbush", "californian poppy",
    "osteospermum", "spring crocus", "bearded iris", "windflower", "tree poppy",
    "gazania", "azalea", "water lily", "rose", "thorn apple",
    "morning glory", "passion flower", "lotus", "toad lily", "anthurium",
    "frangipani", "clematis", "hibiscus", "columbine", "desert-rose",
    "tree mallow", "magnolia", "cyclamen", "watercress", "canna lily",
    "hippeastrum", "bee balm", "ball moss", "foxglove", "bougainvillea",
    "camellia", "mallow", "mexican petunia", "bromelia", "blanket flower",
    "trumpet creeper", "blackberry lily",
)  # fmt: skip

FLOWERS_LAYOUT = """\
<root>/
  jpg/image_00001.jpg ... image_08189.jpg
  imagelabels.mat                  key 'labels': 1×N class labels, 1-based (1..102), label i is image_{i:05d}.jpg
  setid.mat                        keys 'trnid', 'valid', 'tstid': 1-based image numbers of each split"""

SPLIT_KEYS = {"train": "trnid", "val": "valid", "test": "tstid"}


def load_mat(path: Path, dataset: str) -> dict:
    from scipy.io import loadmat  # scipy is needed only here

    try:
        return loadmat(str(path))
    except Exception as err:  # scipy raises ValueError / TypeError / OSError depending on the damage
        raise DatasetError(f"{dataset}: cannot read MATLAB file {path}: {err}") from err


def mat_vector(mat: dict, key: str, path: Path, dataset: str) -> np.ndarray:
    if key not in mat:
        keys = ", ".join(k for k in mat if not k.startswith("__"))
        raise DatasetError(f"{dataset}: {path} has no key {key!r} (keys: {keys})\nexpected layout:\n{FLOWERS_LAYOUT}")
    return np.asarray(mat[key]).reshape(-1).astype(np.int64)


class Flowers102(RecordDataset):
    """Oxford Flowers-102: the class name (e.g. ``"pink primrose"``) is the ``category``.

    Expected layout::

        <root>/
          jpg/image_00001.jpg ...
          imagelabels.mat          labels: 1×8189, values 1..102
          setid.mat                trnid, valid, tstid: 1-based image numbers

    ``category`` is one of the 102 official flower names (``FLOWER_NAMES``, in label order). A multi-class set:
    ``label`` is -1 and ``defect_type`` is the class name. Splits: ``train``, ``val``, ``test`` (``setid.mat``).
    """

    name = "flowers102"
    layout = FLOWERS_LAYOUT
    class_names = FLOWER_NAMES

    def __init__(
        self,
        root: str | Path,
        category: str | None = None,
        split: str = "train",
        image_size: ImageSize = None,
    ) -> None:
        super().__init__(image_size)
        check_split(split, tuple(SPLIT_KEYS), self.name)
        self.root = require_dir(Path(root), self.name, self.layout)
        self.split = split
        jpg_dir = require_dir(self.root / "jpg", self.name, self.layout)
        labels_path = require_file(self.root / "imagelabels.mat", self.name, self.layout)
        setid_path = require_file(self.root / "setid.mat", self.name, self.layout)
        labels = mat_vector(load_mat(labels_path, self.name), "labels", labels_path, self.name)
        ids = mat_vector(load_mat(setid_path, self.name), SPLIT_KEYS[split], setid_path, self.name)
        bad = labels[(labels < 1) | (labels > len(FLOWER_NAMES))]
        if bad.size:
            raise DatasetError(f"{self.name}: {labels_path} holds label {int(bad[0])}, outside 1..{len(FLOWER_NAMES)}")
        bad = ids[(ids < 1) | (ids > labels.size)]
        if bad.size:
            raise DatasetError(
                f"{self.name}: {setid_path} ({SPLIT_KEYS[split]}) names image {int(bad[0])}, but {labels_path} "
                f"labels only images 1..{labels.size}"
            )
        self.available_categories = list(FLOWER_NAMES)
        category = None if category is None else str(category)
        check_category(category, self.available_categories, self.name)
        for image_no in sorted(set(ids.tolist())):
            class_name = FLOWER_NAMES[int(labels[image_no - 1]) - 1]
            if category is not None and class_name != category:
                continue
            path = jpg_dir / f"image_{image_no:05d}.jpg"
            if not path.is_file():
                raise DatasetError(f"{self.name}: image file not found: {path} (listed in {setid_path})")
            self.entries.append(Entry(str(path), UNKNOWN, class_name, class_name))
