"""Views of a synthetic set for tools that read other layouts: :func:`export_mvtec_view` lays a set out as an
MVTec-style folder (``test/<defect>/``, ``ground_truth/<defect>/<id>_mask.png``, ``train/good/``), which the
repository's Folder parser and anomalib's ``Folder`` datamodule read."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

from PIL import Image

from anomgen.data.record import ANOMALOUS, GOOD, NORMAL
from anomgen.data.synthetic.format import (
    PathLike,
    check_name,
    format_id,
    image_array,
    load_set,
)
from anomgen.data.synthetic.writer import check_target
from anomgen.errors import SyntheticSetError
from anomgen.files import atomic_dir

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _link_file(src: Path, dst: Path, link: bool) -> None:
    if link:
        try:
            os.symlink(src.resolve(), dst)
            return
        except OSError:
            pass
    shutil.copyfile(src, dst)


def _write_normals(normals, good_dir: Path, link: bool) -> int:
    """Put the images of ``normals`` (a dataset of records) into ``good_dir`` with stable names; return how many."""
    entries = getattr(normals, "entries", None)
    count = len(normals)
    for index in range(count):
        path = None
        if entries is not None:
            entry = entries[index]
            if entry.label == ANOMALOUS:
                raise SyntheticSetError(f"normals: sample {index} ({entry.image_path}) is labelled anomalous")
            candidate = Path(entry.image_path)
            if candidate.suffix.lower() in _IMAGE_SUFFIXES and candidate.is_file():
                path = candidate
        if path is not None:
            _link_file(path, good_dir / f"{format_id(index)}_{path.stem}{path.suffix.lower()}", link)
            continue
        record = normals[index]
        if record["label"] == ANOMALOUS:
            raise SyntheticSetError(f"normals: sample {index} ({record['image_path']}) is labelled anomalous")
        source = Path(str(record["image_path"]))
        if entries is None and source.suffix.lower() in _IMAGE_SUFFIXES and source.is_file():
            _link_file(source, good_dir / f"{format_id(index)}_{source.stem}{source.suffix.lower()}", link)
            continue
        array = image_array(record["image"], f"normals: sample {index}")
        Image.fromarray(array).save(good_dir / f"{format_id(index)}.png", format="PNG")
    return count


def export_mvtec_view(
    set_dir: PathLike,
    out_dir: PathLike,
    normals=None,
    category: str | None = None,
    link: bool = True,
    allow_missing_masks: bool = False,
    overwrite: bool = False,
) -> Path:
    """Lay out a synthetic set as an MVTec-style folder and return ``out_dir`` (the root a Folder parser reads)::

        <out_dir>/<category>/test/<defect_type>/<id>.png             anomalous rows
        <out_dir>/<category>/test/good/<id>.png                      normal rows
        <out_dir>/<category>/ground_truth/<defect_type>/<id>_mask.png
        <out_dir>/<category>/train/good/...                          the images of ``normals``, if given

    ``category`` defaults to the set's only category (an error if it has several); when given, only its rows are
    exported. An anomalous row without a mask is an error naming its id, since MVTec-style readers expect a mask per
    defect image and an all-zero mask would claim it has no defect pixels; ``allow_missing_masks=True`` writes no
    ground-truth file for such rows instead. ``normals`` is a dataset of records (e.g. the real support set); files
    on disk are linked or copied under ``<index>_<stem>``, in-memory images are written as ``<index>.png``.
    ``link=True`` symlinks files instead of copying them (copying where a symlink cannot be made), so the view
    follows the set it points to. The category folder is built under a temporary name and renamed when complete;
    an existing one is an error unless ``overwrite=True``.
    """
    set_dir = Path(set_dir).absolute()
    out_dir = Path(out_dir)
    _, rows = load_set(set_dir)
    categories = sorted({r["category"] for r in rows})
    if category is None:
        if len(categories) != 1:
            raise SyntheticSetError(
                f"{set_dir} holds several categories ({', '.join(categories)}); pass category= to pick one"
            )
        category = categories[0]
    check_name(category, "category", "export_mvtec_view")
    rows = [r for r in rows if r["category"] == category]
    if not rows:
        raise SyntheticSetError(f"{set_dir} has no sample of category {category!r}; it has {', '.join(categories)}")
    missing_masks = [r["id"] for r in rows if r["label"] == ANOMALOUS and r["mask"] is None]
    if missing_masks and not allow_missing_masks:
        raise SyntheticSetError(
            f"{set_dir}: anomalous sample(s) without a mask: {', '.join(missing_masks[:10])}"
            + (f" and {len(missing_masks) - 10} more" if len(missing_masks) > 10 else "")
            + "; MVTec-style readers expect one mask per defect image. "
            "Pass allow_missing_masks=True to export them without a ground-truth file."
        )
    if missing_masks:
        warnings.warn(
            f"export_mvtec_view: {len(missing_masks)} anomalous sample(s) exported without a ground-truth mask",
            stacklevel=2,
        )

    target = out_dir / category
    what = "MVTec view category folder"
    check_target(target, overwrite, what=what)
    with atomic_dir(target, overwrite=overwrite) as tmp:
        for row in rows:
            folder = GOOD if row["label"] == NORMAL else row["defect_type"]
            image = set_dir / row["image"]
            (tmp / "test" / folder).mkdir(parents=True, exist_ok=True)
            _link_file(image, tmp / "test" / folder / f"{row['id']}{image.suffix}", link)
            if row["label"] == ANOMALOUS and row["mask"] is not None:
                (tmp / "ground_truth" / folder).mkdir(parents=True, exist_ok=True)
                _link_file(set_dir / row["mask"], tmp / "ground_truth" / folder / f"{row['id']}_mask.png", link)
        if normals is not None:
            good_dir = tmp / "train" / GOOD
            good_dir.mkdir(parents=True)
            _write_normals(normals, good_dir, link)
        check_target(target, overwrite, what=what)  # nothing appeared meanwhile that may not be replaced
    return out_dir
