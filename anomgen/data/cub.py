"""CUB-200-2011 (Caltech-UCSD Birds): 200 bird species, a multi-class set for one-class / near-OOD tasks."""

from __future__ import annotations

from pathlib import Path

from anomgen.data.base import ImageSize, RecordDataset, check_category, check_split, require_dir, require_file
from anomgen.data.record import UNKNOWN, Entry
from anomgen.errors import DatasetError

CUB_LAYOUT = """\
<root>/                            the CUB_200_2011 folder of the official archive
  images.txt                       <image_id> <relative path>
                                   e.g. 1 001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg
  image_class_labels.txt           <image_id> <class_id>
  train_test_split.txt             <image_id> <is_training_image: 1 or 0>
  classes.txt                      <class_id> <class name>      e.g. 1 001.Black_footed_Albatross
  images/<relative path> ...       the JPEG files"""

SPLITS = ("train", "test")


def read_id_table(path: Path, dataset: str) -> dict[str, str]:
    """Read a CUB ``<id> <value>`` text file into ``{id: value}``; the value is the rest of the line."""
    table: dict[str, str] = {}
    with open(path) as f:
        for line_no, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            parts = line.split(maxsplit=1)
            if len(parts) != 2:
                raise DatasetError(f"{dataset}: {path} line {line_no}: expected '<id> <value>', got {line!r}")
            table[parts[0]] = parts[1].strip()
    return table


class CUB(RecordDataset):
    """CUB-200-2011: the class name (e.g. ``001.Black_footed_Albatross``) is the ``category``.

    Expected layout::

        <root>/
          images.txt  image_class_labels.txt  train_test_split.txt  classes.txt
          images/001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg ...

    A multi-class set: ``label`` is -1 and ``defect_type`` is the class name until a task protocol picks the
    normal class. ``category`` keeps one class; ``None`` keeps them all. Splits: ``train``, ``test`` (the
    official ``train_test_split.txt``).
    """

    name = "cub"
    layout = CUB_LAYOUT

    def __init__(
        self,
        root: str | Path,
        category: str | None = None,
        split: str = "train",
        image_size: ImageSize = None,
    ) -> None:
        super().__init__(image_size)
        check_split(split, SPLITS, self.name)
        self.root = require_dir(Path(root), self.name, self.layout)
        self.split = split
        tables = {
            name: read_id_table(require_file(self.root / name, self.name, self.layout), self.name)
            for name in ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")
        }
        images_dir = require_dir(self.root / "images", self.name, self.layout)
        images, labels, is_train, classes = (tables[k] for k in tables)
        self.available_categories = list(classes.values())
        category = None if category is None else str(category)
        check_category(category, self.available_categories, self.name)
        want_train = "1" if split == "train" else "0"
        for image_id, rel_path in sorted(images.items(), key=lambda kv: _id_key(kv[0])):
            for table_name, table in (("image_class_labels.txt", labels), ("train_test_split.txt", is_train)):
                if image_id not in table:
                    raise DatasetError(f"{self.name}: image id {image_id} ({rel_path}) is missing from {table_name}")
            if is_train[image_id] not in ("0", "1"):
                raise DatasetError(
                    f"{self.name}: train_test_split.txt gives image id {image_id} the value {is_train[image_id]!r}, "
                    "expected 1 (train) or 0 (test)"
                )
            class_name = classes.get(labels[image_id])
            if class_name is None:
                raise DatasetError(
                    f"{self.name}: image id {image_id} has class id {labels[image_id]} that classes.txt does not list"
                )
            if is_train[image_id] != want_train or (category is not None and class_name != category):
                continue
            path = images_dir / rel_path
            if not path.is_file():
                raise DatasetError(f"{self.name}: image file not found: {path} (image id {image_id} in images.txt)")
            self.entries.append(Entry(str(path), UNKNOWN, class_name, class_name))


def _id_key(image_id: str) -> tuple[int, str]:
    return (int(image_id), image_id) if image_id.isdigit() else (1 << 62, image_id)
