"""VisA (Visual Anomaly dataset, Zou et al.), read in place through its official split file."""

from __future__ import annotations

import csv
from pathlib import Path

from anomgen.data.base import ImageSize, RecordDataset, check_category, check_split, require_dir, require_file
from anomgen.data.record import ANOMALOUS, GOOD, NORMAL, Entry
from anomgen.errors import DatasetError

VISA_CATEGORIES = (
    "candle",
    "capsules",
    "cashew",
    "chewinggum",
    "fryum",
    "macaroni1",
    "macaroni2",
    "pcb1",
    "pcb2",
    "pcb3",
    "pcb4",
    "pipe_fryum",
)

VISA_LAYOUT = """\
<root>/
  split_csv/1cls.csv               header: object,split,label,image,mask
                                   e.g. candle,test,anomaly,candle/Data/Images/Anomaly/000.JPG,
                                        candle/Data/Masks/Anomaly/000.png
                                   split: train|test; label: normal|anomaly; paths relative to <root>;
                                   mask empty for normal images
  candle/Data/Images/Normal/0000.JPG ...
  candle/Data/Images/Anomaly/000.JPG ...
  candle/Data/Masks/Anomaly/000.png ...   masks hold small integers (0 background, 1, 2, ... defects)
  capsules/ ... (12 objects: candle capsules cashew chewinggum fryum macaroni1 macaroni2 pcb1 pcb2 pcb3 pcb4
  pipe_fryum)"""

CSV_COLUMNS = ("object", "split", "label", "image", "mask")
SPLITS = ("train", "test")
LABELS = {"normal": NORMAL, "anomaly": ANOMALOUS}
ANOMALY = "anomaly"


class VisA(RecordDataset):
    """VisA: 12 objects; the split file ``split_csv/1cls.csv`` says which image goes where.

    Expected layout::

        <root>/
          split_csv/1cls.csv       object,split,label,image,mask
          candle/Data/Images/Normal/0000.JPG
          candle/Data/Images/Anomaly/000.JPG
          candle/Data/Masks/Anomaly/000.png

    Images and masks are read where they are (nothing is copied). Masks are binarised with ``> 0`` (VisA masks
    hold small integers). The categories are the ``object`` values of the split file; ``defect_type`` of an
    anomaly is ``"anomaly"`` (the 1-class split file has no defect types). Splits: ``train``, ``test``.
    ``split_file`` picks another file in ``split_csv/`` with the same columns.
    """

    name = "visa"
    layout = VISA_LAYOUT

    def __init__(
        self,
        root: str | Path,
        category: str | None = None,
        split: str = "train",
        image_size: ImageSize = None,
        split_file: str = "1cls.csv",
    ) -> None:
        super().__init__(image_size)
        check_split(split, SPLITS, self.name)
        self.root = require_dir(Path(root), self.name, self.layout)
        self.split = split
        csv_path = require_file(self.root / "split_csv" / split_file, self.name, self.layout)
        rows = self._read_csv(csv_path)
        self.available_categories = list(dict.fromkeys(row["object"] for _, row in rows))
        category = None if category is None else str(category)
        check_category(category, self.available_categories, self.name)
        for line, row in rows:
            if row["split"] != split or (category is not None and row["object"] != category):
                continue
            self.entries.append(self._entry(csv_path, line, row))

    def _read_csv(self, csv_path: Path) -> list[tuple[int, dict[str, str]]]:
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in CSV_COLUMNS if c not in header]
            if missing:
                raise DatasetError(
                    f"{self.name}: {csv_path} lacks column(s) {', '.join(missing)}; header is {','.join(header)}\n"
                    f"expected layout:\n{self.layout}"
                )
            reader.fieldnames = header
            rows = [(reader.line_num, {k: (v or "").strip() for k, v in row.items() if k}) for row in reader]
        for line, row in rows:
            if row["split"] not in SPLITS:
                raise DatasetError(f"{self.name}: {csv_path} line {line}: split {row['split']!r} is not train/test")
            if row["label"] not in LABELS:
                raise DatasetError(
                    f"{self.name}: {csv_path} line {line}: label {row['label']!r} is not normal/anomaly"
                )
        return rows

    def _entry(self, csv_path: Path, line: int, row: dict[str, str]) -> Entry:
        image = self.root / row["image"]
        if not image.is_file():
            raise DatasetError(f"{self.name}: image file not found: {image} (listed in {csv_path} line {line})")
        label = LABELS[row["label"]]
        if label == NORMAL:
            return Entry(str(image), NORMAL, row["object"], GOOD)
        if not row["mask"]:
            raise DatasetError(
                f"{self.name}: anomalous image {image} has no mask in {csv_path} line {line}\n"
                f"expected layout:\n{self.layout}"
            )
        mask = self.root / row["mask"]
        if not mask.is_file():
            raise DatasetError(f"{self.name}: mask file not found: {mask} for image {image} ({csv_path} line {line})")
        return Entry(str(image), ANOMALOUS, row["object"], ANOMALY, str(mask))
