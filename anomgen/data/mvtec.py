"""MVTec AD, and the MVTec-style folder layout that :class:`~anomgen.data.folder.Folder` shares with it.

The parsing of the layout lives once, in :class:`MVTecLayout`; :class:`MVTecAD` restricts it to the 15 official
categories and to PNG files, :class:`~anomgen.data.folder.Folder` accepts any category name and the usual image
extensions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from anomgen.data.base import ImageSize, RecordDataset, check_category, check_split, require_dir
from anomgen.data.record import ANOMALOUS, GOOD, NORMAL, Entry
from anomgen.errors import DatasetError

MVTEC_CATEGORIES = (
    "bottle",
    "cable",
    "capsule",
    "carpet",
    "grid",
    "hazelnut",
    "leather",
    "metal_nut",
    "pill",
    "screw",
    "tile",
    "toothbrush",
    "transistor",
    "wood",
    "zipper",
)

MVTEC_LAYOUT = """\
<root>/
  <category>/                      one of: bottle cable capsule carpet grid hazelnut leather metal_nut pill
                                   screw tile toothbrush transistor wood zipper
    train/good/000.png ...         normal training images
    test/good/000.png ...          normal test images
    test/<defect>/000.png ...      anomalous test images, one folder per defect type
    ground_truth/<defect>/000_mask.png ...
                                   one mask per anomalous test image, paired by file stem (<stem>_mask.png)"""

SPLITS = ("train", "test")
MASK_SUFFIX = "_mask"


def list_images(folder: Path, extensions: Sequence[str]) -> list[Path]:
    """The image files directly in ``folder`` (extension matched case-insensitively), sorted by name."""
    exts = {e.lower() for e in extensions}
    return sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in exts
    )


def mask_index(folder: Path, extensions: Sequence[str]) -> dict[str, Path]:
    """Map an image stem to its mask file in ``folder``: ``<stem>_mask.<ext>`` first, else ``<stem>.<ext>``."""
    index: dict[str, Path] = {}
    if not folder.is_dir():
        return index
    plain: dict[str, Path] = {}
    for p in list_images(folder, extensions):
        if p.stem.endswith(MASK_SUFFIX):
            index[p.stem[: -len(MASK_SUFFIX)]] = p
        else:
            plain[p.stem] = p
    for stem, p in plain.items():
        index.setdefault(stem, p)
    return index


class MVTecLayout(RecordDataset):
    """Parser of the MVTec-style folder layout (see ``MVTEC_LAYOUT``); subclasses say which categories count.

    Train split: ``<category>/train/good/*`` (label 0). Test split: ``<category>/test/good/*`` (label 0) and
    ``<category>/test/<defect>/*`` (label 1, ``defect_type`` = folder name), each anomalous image paired with
    ``ground_truth/<defect>/<stem>_mask.<ext>`` by file stem. An anomalous image without a mask is an error
    naming the image, unless ``masks_required`` is false (then its mask is all zeros and ``mask_path`` is ``""``).
    """

    name = "mvtec-layout"
    layout = MVTEC_LAYOUT
    splits = SPLITS
    extensions: tuple[str, ...] = (".png",)

    def __init__(
        self,
        root: str | Path,
        category: str | None = None,
        split: str = "train",
        image_size: ImageSize = None,
        masks_required: bool = True,
    ) -> None:
        super().__init__(image_size)
        check_split(split, self.splits, self.name)
        self.root = require_dir(Path(root), self.name, self.layout)
        self.split = split
        self.masks_required = masks_required
        self.available_categories = self.find_categories(self.root)
        if not self.available_categories:
            raise DatasetError(f"{self.name}: no category folder found in {self.root}\nexpected layout:\n{self.layout}")
        category = None if category is None else str(category)
        self.check_requested_category(category)
        for cat in [category] if category is not None else self.available_categories:
            self.entries += self.parse_category(self.root / cat, cat, split)

    # -- what a subclass decides ------------------------------------------------------------------------------

    def find_categories(self, root: Path) -> list[str]:
        """The category folders under ``root`` (sorted)."""
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))

    def check_requested_category(self, category: str | None) -> None:
        check_category(category, self.available_categories, self.name)

    # -- the layout ---------------------------------------------------------------------------------------------

    def _images_in(self, folder: Path) -> list[Path]:
        require_dir(folder, self.name, self.layout)
        images = list_images(folder, self.extensions)
        if not images:
            raise DatasetError(
                f"{self.name}: no image ({', '.join(self.extensions)}) in {folder}\nexpected layout:\n{self.layout}"
            )
        return images

    def parse_category(self, folder: Path, category: str, split: str) -> list[Entry]:
        if split == "train":
            return [Entry(str(p), NORMAL, category, GOOD) for p in self._images_in(folder / "train" / GOOD)]
        test_dir = require_dir(folder / "test", self.name, self.layout)
        entries: list[Entry] = []
        defect_dirs = sorted(p for p in test_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not defect_dirs:
            raise DatasetError(f"{self.name}: no folder in {test_dir}\nexpected layout:\n{self.layout}")
        for defect_dir in defect_dirs:
            defect = defect_dir.name
            if defect == GOOD:
                entries += [Entry(str(p), NORMAL, category, GOOD) for p in self._images_in(defect_dir)]
                continue
            mask_dir = folder / "ground_truth" / defect
            masks = mask_index(mask_dir, self.extensions + (".png",))
            for image in self._images_in(defect_dir):
                mask = masks.get(image.stem)
                if mask is None and self.masks_required:
                    raise DatasetError(
                        f"{self.name}: anomalous image {image} has no mask; expected "
                        f"{mask_dir / (image.stem + MASK_SUFFIX + '.png')}\nexpected layout:\n{self.layout}"
                    )
                entries.append(Entry(str(image), ANOMALOUS, category, defect, str(mask) if mask else None))
        return entries


class MVTecAD(MVTecLayout):
    """MVTec AD (Bergmann et al.): 15 industrial categories, train = normals only, test = normals + defects.

    Expected layout (as the official archive unpacks)::

        <root>/
          bottle/
            train/good/000.png ...
            test/good/000.png ...
            test/broken_large/000.png ...
            ground_truth/broken_large/000_mask.png ...
          cable/ ...

    ``category=None`` gives every official category found under ``root``; the valid categories are the official
    names present on disk. Splits: ``train``, ``test``. Masks are paired with their images by file stem.
    """

    name = "mvtec_ad"
    layout = MVTEC_LAYOUT
    extensions = (".png",)

    def find_categories(self, root: Path) -> list[str]:
        return [c for c in MVTEC_CATEGORIES if (root / c).is_dir()]

    def check_requested_category(self, category: str | None) -> None:
        if category in MVTEC_CATEGORIES and category not in self.available_categories:
            require_dir(self.root / category, self.name, self.layout)
        check_category(category, self.available_categories, self.name)
