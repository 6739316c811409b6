"""The synthetic-set format: ids and names, manifest rows, counts, and reading / validating ``manifest.jsonl`` and
``set.json`` (see :mod:`anomgen.data.synthetic` for the layout)."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from anomgen.data.record import ANOMALOUS, NORMAL
from anomgen.errors import SyntheticSetError
from anomgen.files import to_json
from anomgen.pixels import to_uint8

FORMAT_VERSION = 1
MANIFEST = "manifest.jsonl"
SET_INFO = "set.json"
IMAGES = "images"
MASKS = "masks"

ROW_KEYS = ("id", "image", "mask", "label", "generator", "category", "defect_type", "sources", "params", "scores")
# Hidden working folders: the temporary build of a set or view, a set being replaced, a DDP rank's shard.
_WORK_NAME = re.compile(r"^\..+\.(tmp|old|shard)-[^/\\]+$")
_IMAGE_TOLERANCE = 1e-3

PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------------------- ids, names


def format_id(index: int) -> str:
    """The id of the sample with global index ``index``: zero-padded to at least 6 digits (``42`` -> ``"000042"``)."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise TypeError(f"a sample index must be an int, got {type(index).__name__}")
    if index < 0:
        raise ValueError(f"a sample index must be >= 0, got {index}")
    return f"{int(index):06d}"


def sort_key(sample_id: str) -> tuple:
    """Order of ids in a manifest: numeric ids by value (so that ``"1000000"`` follows ``"999999"``), then others."""
    if sample_id.isdigit():
        return (0, int(sample_id), sample_id)
    return (1, 0, sample_id)


def check_name(value: Any, what: str, context: str) -> str:
    """A string that is also used as a file or folder name (id, category, defect type, generator)."""
    if not isinstance(value, str) or not value:
        raise SyntheticSetError(f"{context}: {what} must be a non-empty string, got {value!r}")
    if value in (".", "..") or value.startswith(".") or "/" in value or "\\" in value or "\x00" in value:
        raise SyntheticSetError(
            f"{context}: {what} {value!r} cannot be used as a file name (no '/', '\\', leading '.')"
        )
    return value


def shard_path(out_dir: PathLike, rank: int) -> Path:
    """Where DDP rank ``rank`` writes its shard of the set that will be merged into ``out_dir``.

    A hidden sibling of ``out_dir`` (``.<name>.shard-<rank>``), so that every rank finds the same folders without
    talking to the others and a leftover shard is never mistaken for a set.
    """
    out = Path(out_dir)
    return out.parent / f".{out.name}.shard-{int(rank)}"


def is_work_name(name: str) -> bool:
    """Whether ``name`` is a hidden work folder (a temporary build, a set moved aside, a shard), never a set."""
    return bool(_WORK_NAME.match(name))


# ------------------------------------------------------------------------------------------------------- JSON values


def to_json_value(value: Any, key: str = "") -> Any:
    """``value`` as plain JSON data for the manifest or set.json (:func:`anomgen.files.to_json` with ``strict=True``):
    anything without a faithful JSON form (NaN, an object, a non-string key) is an error naming ``key``."""
    try:
        return to_json(value, strict=True, key=key)
    except ValueError as err:
        raise SyntheticSetError(str(err)) from None


def manifest_text(rows: Iterable[dict]) -> str:
    """The text of ``manifest.jsonl``: one JSON object per row and line."""
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def set_info_text(info: dict) -> str:
    return json.dumps(info, indent=2, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------------------------------------------------- manifest


def _check_row(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise SyntheticSetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise SyntheticSetError(f"{where}: missing key(s) {', '.join(missing)}")
    check_name(row["id"], "id", where)
    for key in ("generator", "category", "defect_type"):
        check_name(row[key], key, where)
    label = row["label"]
    if isinstance(label, bool) or label not in (NORMAL, ANOMALOUS):
        raise SyntheticSetError(f"{where}: label must be 0 or 1, got {label!r}")
    for key in ("image", "mask"):
        value = row[key]
        if key == "mask" and value is None:
            continue
        if not isinstance(value, str) or not value:
            raise SyntheticSetError(f"{where}: {key} must be a relative path string, got {value!r}")
        parts = Path(value).parts
        if Path(value).is_absolute() or ".." in parts:
            raise SyntheticSetError(f"{where}: {key} path {value!r} must be relative and inside the set")
    if not isinstance(row["sources"], list) or not all(isinstance(s, str) for s in row["sources"]):
        raise SyntheticSetError(f"{where}: sources must be a list of strings, got {row['sources']!r}")
    for key in ("params", "scores"):
        if not isinstance(row[key], dict):
            raise SyntheticSetError(f"{where}: {key} must be a JSON object, got {row[key]!r}")
    return row


def listed_file(folder: Path, row: dict, key: str) -> Path:
    """The ``key`` file (``image`` / ``mask``) of manifest ``row`` in the set or shard ``folder``. A path that leads out
    of the folder through a symbolic link is refused, as ``..`` in the manifest is (:func:`_check_row`): a set's files
    lie inside it, so that reading a set never reads anything else."""
    path = folder / row[key]
    target = path.resolve()
    if not target.is_relative_to(folder.resolve()):
        raise SyntheticSetError(f"{folder}: {key} {row[key]} of sample {row['id']!r} leads out of the set through a "
                                f"symbolic link (to {target}); a set's files must lie inside its folder")
    return path


def _manifest_file(path: PathLike) -> Path:
    path = Path(path)
    return path / MANIFEST if path.is_dir() else path


def read_manifest(path: PathLike) -> list[dict]:
    """Read and validate ``manifest.jsonl`` (``path`` is the file or the folder holding it).

    A line that is not a JSON object with every manifest key is an error naming the file and the line number.
    Blank lines are skipped. Rows are returned in file order.
    """
    file = _manifest_file(path)
    if not file.is_file():
        raise SyntheticSetError(f"missing {MANIFEST}: {file} not found")
    rows = []
    with open(file, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{file}: line {lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise SyntheticSetError(f"{where}: malformed manifest line, not valid JSON ({err.msg})") from None
            rows.append(_check_row(row, f"{where}: malformed manifest line"))
    return rows


def compute_counts(rows: Sequence[dict]) -> dict:
    """The ``counts`` block of ``set.json`` for these manifest rows."""
    anomalous = sum(1 for r in rows if r["label"] == ANOMALOUS)
    return {
        "total": len(rows),
        "anomalous": anomalous,
        "normal": len(rows) - anomalous,
        "by_defect_type": dict(sorted(Counter(r["defect_type"] for r in rows).items())),
        "by_category": dict(sorted(Counter(r["category"] for r in rows).items())),
    }



# ------------------------------------------------------------------------------------------------------------ pixels


def image_array(image: Any, context: str) -> np.ndarray:
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image)
    if not isinstance(image, torch.Tensor):
        raise SyntheticSetError(f"{context}: image must be a tensor, got {type(image).__name__}")
    image = image.detach().cpu()
    if image.dim() != 3 or image.shape[0] != 3:
        raise SyntheticSetError(f"{context}: image must be 3×H×W RGB, got shape {tuple(image.shape)}")
    if image.dtype == torch.uint8:
        array = image
    elif image.is_floating_point():
        image = image.float()
        if not torch.isfinite(image).all():
            raise SyntheticSetError(f"{context}: image holds NaN or infinite values")
        low, high = float(image.min()), float(image.max())
        if low < -_IMAGE_TOLERANCE or high > 1.0 + _IMAGE_TOLERANCE:
            raise SyntheticSetError(
                f"{context}: image values must lie in [0, 1], got [{low:.4f}, {high:.4f}] "
                "(convert diffusion outputs with anomgen.pixels.from_diffusion_range)"
            )
        array = to_uint8(image)
    else:
        raise SyntheticSetError(f"{context}: image must be a float tensor in [0, 1] (or uint8), got {image.dtype}")
    return np.ascontiguousarray(array.permute(1, 2, 0).numpy())


def mask_array(mask: Any, size: tuple[int, int], context: str) -> np.ndarray:
    if isinstance(mask, np.ndarray):
        mask = torch.from_numpy(mask)
    if not isinstance(mask, torch.Tensor):
        raise SyntheticSetError(f"{context}: mask must be a tensor or None, got {type(mask).__name__}")
    mask = mask.detach().cpu()
    if mask.dim() == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if tuple(mask.shape) != size:
        raise SyntheticSetError(f"{context}: mask must be H×W = {size} like its image, got {tuple(mask.shape)}")
    return np.ascontiguousarray(((mask > 0).numpy().astype(np.uint8)) * 255)



# ----------------------------------------------------------------------------------------------------------- the set


def read_set_info(path: PathLike) -> dict:
    """Read and validate ``set.json`` of the set at ``path``."""
    file = Path(path) / SET_INFO
    if not file.is_file():
        raise SyntheticSetError(
            f"missing {SET_INFO}: {file} not found; {path} is not a finished synthetic set "
            "(an unmerged shard or an interrupted write?)"
        )
    try:
        info = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SyntheticSetError(f"{file}: malformed {SET_INFO}, not valid JSON ({err.msg} at line {err.lineno})")
    if not isinstance(info, dict):
        raise SyntheticSetError(f"{file}: malformed {SET_INFO}, expected a JSON object")
    version = info.get("format_version")
    if version != FORMAT_VERSION:
        raise SyntheticSetError(f"{file}: format_version is {version!r}; this reader understands {FORMAT_VERSION}")
    if not isinstance(info.get("counts"), dict):
        raise SyntheticSetError(f"{file}: malformed {SET_INFO}, no 'counts' object")
    return info


def load_set(path: PathLike, allow_work_name: bool = False) -> tuple[dict, list[dict]]:
    """``(set.json, manifest rows)`` of the complete set at ``path``, or :class:`SyntheticSetError` naming what is
    missing or malformed: set.json, the manifest, duplicate or unsorted ids, listed files that are missing, counts
    that disagree with the rows. A hidden work folder (``allow_work_name=False``) is never a set."""
    path = Path(path)
    if not path.exists():
        raise SyntheticSetError(f"synthetic set folder not found: {path}")
    if not path.is_dir():
        raise SyntheticSetError(f"{path} is not a folder")
    if not allow_work_name and is_work_name(path.name):
        raise SyntheticSetError(
            f"{path} is a leftover temporary folder of an interrupted write or merge, not a synthetic set; "
            "remove it and write the set again"
        )
    info = read_set_info(path)
    if not (path / MANIFEST).is_file():
        raise SyntheticSetError(f"missing {MANIFEST}: {path / MANIFEST} not found")
    rows = read_manifest(path)
    ids = [r["id"] for r in rows]
    duplicates = sorted({i for i in ids if ids.count(i) > 1}) if len(set(ids)) != len(ids) else []
    if duplicates:
        raise SyntheticSetError(f"{path / MANIFEST}: id(s) listed more than once: {', '.join(duplicates[:10])}")
    if ids != sorted(ids, key=sort_key):
        raise SyntheticSetError(f"{path / MANIFEST}: rows are not sorted by id")
    missing = []
    for row in rows:
        for key in ("image", "mask"):
            if row[key] is not None and not listed_file(path, row, key).is_file():
                missing.append(f"{row[key]} ({key} of sample {row['id']})")
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise SyntheticSetError(f"{path}: listed file(s) missing: {'; '.join(missing[:5])}{more}")
    actual = compute_counts(rows)
    stated = info["counts"]
    for key, value in actual.items():
        if key in stated and stated[key] != value:
            raise SyntheticSetError(
                f"{path / SET_INFO}: counts.{key} is {stated[key]!r} but {MANIFEST} gives {value!r}"
            )
    if "total" not in stated:
        raise SyntheticSetError(f"{path / SET_INFO}: counts.total is missing")
    return info, rows
