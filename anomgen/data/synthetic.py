"""The synthetic set: the on-disk interface between generation and everything else.

A synthetic set is a folder::

    <set>/
      manifest.jsonl   one JSON object per line, sorted by id:
                       {"id": "000042", "image": "images/000042.png", "mask": "masks/000042.png" or null,
                        "label": 1, "generator": "noise_patch", "category": "3", "defect_type": "noise_patch",
                        "sources": ["sklearn-digits:00012"], "params": {...}, "scores": {}}
      set.json         {"format_version": 1, "generator": ..., "config": {...}, "checkpoint": ..., "code_version": ...,
                        "task": {...}, "counts": {"total": N, "anomalous": A, "normal": M,
                        "by_defect_type": {...}, "by_category": {...}}, "created_at": ISO time}
      images/          RGB 8-bit PNG, one per sample
      masks/           L-mode PNG with values 0 / 255, one per sample that has a mask

Writing is atomic. Samples go into a *shard* (a folder that is not a set: it never holds ``set.json``) through
:class:`SetWriter`; under DDP every rank writes its own shard (see :func:`shard_path`) and rank 0 calls
:func:`merge_shards` after a barrier. The merge builds the set under a hidden temporary sibling name
(``.<name>.tmp-<random>``) and renames it into place only when it is complete, so that an interrupted run never
leaves a folder that looks like a finished set. :func:`write_set` does the same in one process.

Readers: :class:`SyntheticSet` yields the project's record, so that synthetic and real data flow through the same
code; :func:`export_mvtec_view` lays a set out as an MVTec-style folder (``test/<defect>/``,
``ground_truth/<defect>/<id>_mask.png``, ``train/good/``) for parsers and tools that read that layout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from anomgen.data.base import ImageSize, RecordDataset
from anomgen.data.record import ANOMALOUS, GOOD, NORMAL, Entry
from anomgen.errors import SyntheticSetError
from anomgen.files import write_atomic
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
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

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


def _check_name(value: Any, what: str, context: str) -> str:
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


def _work_path(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{uuid.uuid4().hex[:10]}"


def _is_work_name(name: str) -> bool:
    return bool(_WORK_NAME.match(name))


# ------------------------------------------------------------------------------------------------------- JSON values


def to_json_value(value: Any, key: str = "") -> Any:
    """Turn ``value`` into plain JSON data: tensors and numpy values become python numbers / lists.

    Anything that has no faithful JSON form is an error naming ``key`` (its dotted path in the params).
    """
    name = key or "<value>"
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, np.generic):
        return to_json_value(value.item(), key)
    if isinstance(value, np.ndarray):
        return to_json_value(value.tolist(), key)
    if isinstance(value, torch.Tensor):
        return to_json_value(value.detach().cpu().tolist(), key)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise SyntheticSetError(
                    f"{name}: keys must be strings to survive JSON, got key {k!r} ({type(k).__name__})"
                )
            out[k] = to_json_value(v, f"{key}.{k}" if key else k)
        return out
    if isinstance(value, (list, tuple)):
        return [to_json_value(v, f"{key}[{i}]") for i, v in enumerate(value)]
    raise SyntheticSetError(
        f"{name}: value of type {type(value).__name__} is not JSON-serialisable; "
        "use numbers, strings, booleans, None, lists, dicts, tensors or numpy values"
    )


def _dump_line(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _write_text_atomic(path: Path, text: str) -> None:
    write_atomic(path, text)


def _manifest_text(rows: Iterable[dict]) -> str:
    return "".join(_dump_line(row) + "\n" for row in rows)


# ---------------------------------------------------------------------------------------------------------- manifest


def _check_row(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise SyntheticSetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    missing = [k for k in ROW_KEYS if k not in row]
    if missing:
        raise SyntheticSetError(f"{where}: missing key(s) {', '.join(missing)}")
    _check_name(row["id"], "id", where)
    for key in ("generator", "category", "defect_type"):
        _check_name(row[key], key, where)
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


# ------------------------------------------------------------------------------------------------------------ writer


def _image_array(image: Any, context: str) -> np.ndarray:
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


def _mask_array(mask: Any, size: tuple[int, int], context: str) -> np.ndarray:
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


class SetWriter:
    """Writes samples into a folder that is not (yet) a finished set: a whole set before merging, or one rank's shard.

    :meth:`add` writes the PNG files at once; :meth:`close` writes ``manifest.jsonl`` sorted by id. A shard never
    gets ``set.json``: only :func:`merge_shards` makes a set. A folder that already holds files is refused unless
    ``overwrite=True`` (then it is emptied), and a finished set is always refused.
    """

    def __init__(self, directory: PathLike, overwrite: bool = False) -> None:
        self.directory = Path(directory)
        if (self.directory / SET_INFO).exists():
            raise SyntheticSetError(
                f"{self.directory} is a finished synthetic set; SetWriter only writes shards. "
                "Write a new set with write_set / merge_shards (overwrite=True replaces a set)."
            )
        if self.directory.exists():
            if not self.directory.is_dir():
                raise SyntheticSetError(f"{self.directory} exists and is not a folder")
            if any(self.directory.iterdir()):
                if not overwrite:
                    raise SyntheticSetError(
                        f"shard folder {self.directory} is not empty (a leftover of an earlier run?); "
                        "remove it or pass overwrite=True to empty it"
                    )
                shutil.rmtree(self.directory)
        (self.directory / IMAGES).mkdir(parents=True, exist_ok=True)
        (self.directory / MASKS).mkdir(parents=True, exist_ok=True)
        self._rows: dict[str, dict] = {}
        self._closed = False

    def __enter__(self) -> SetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def rows(self) -> list[dict]:
        """The manifest rows written so far, sorted by id."""
        return [dict(self._rows[k]) for k in sorted(self._rows, key=sort_key)]

    def add(
        self,
        id: str,
        image: torch.Tensor,
        mask: torch.Tensor | None = None,
        label: int = ANOMALOUS,
        generator: str = "",
        category: str = "",
        defect_type: str | None = None,
        sources: Iterable[str] = (),
        params: Mapping[str, Any] | None = None,
        scores: Mapping[str, Any] | None = None,
    ) -> dict:
        """Write one sample and return its manifest row.

        ``image`` is a float tensor 3×H×W in [0, 1]; ``mask`` an H×W tensor binarised with ``> 0``, or None.
        ``defect_type`` defaults to ``"good"`` for a normal sample and to the generator's name for an anomalous one.
        """
        if self._closed:
            raise SyntheticSetError(f"{self.directory}: SetWriter is closed; no more samples can be added")
        if not isinstance(id, str):
            raise SyntheticSetError(
                f"{self.directory}: sample ids are strings (use format_id(index)), got {id!r} ({type(id).__name__})"
            )
        context = f"{self.directory}: sample {id!r}"
        _check_name(id, "id", str(self.directory))
        if id in self._rows:
            raise SyntheticSetError(f"{context}: id already written to this folder; every id must be unique")
        if isinstance(label, bool) or label not in (NORMAL, ANOMALOUS):
            raise SyntheticSetError(f"{context}: label must be 0 (normal) or 1 (anomalous), got {label!r}")
        _check_name(generator, "generator", context)
        _check_name(category, "category", context)
        if defect_type is None:
            defect_type = GOOD if label == NORMAL else generator
        _check_name(defect_type, "defect_type", context)
        if label == NORMAL and defect_type != GOOD:
            raise SyntheticSetError(f"{context}: a normal sample has defect_type {GOOD!r}, got {defect_type!r}")
        if label == ANOMALOUS and defect_type == GOOD:
            raise SyntheticSetError(f"{context}: an anomalous sample cannot have defect_type {GOOD!r}")
        if isinstance(sources, str):
            sources = [sources]
        source_list = [str(s) for s in sources]
        params_json = to_json_value(dict(params or {}), "params")
        scores_json = to_json_value(dict(scores or {}), "scores")

        image_array = _image_array(image, context)
        mask_array = None if mask is None else _mask_array(mask, image_array.shape[:2], context)
        if label == NORMAL and mask_array is not None and mask_array.any():
            raise SyntheticSetError(f"{context}: a normal sample cannot have defect pixels in its mask")

        image_rel = f"{IMAGES}/{id}.png"
        Image.fromarray(image_array).save(self.directory / image_rel, format="PNG")
        mask_rel = None
        if mask_array is not None:
            mask_rel = f"{MASKS}/{id}.png"
            Image.fromarray(mask_array).save(self.directory / mask_rel, format="PNG")

        row = {
            "id": id,
            "image": image_rel,
            "mask": mask_rel,
            "label": int(label),
            "generator": generator,
            "category": category,
            "defect_type": defect_type,
            "sources": source_list,
            "params": params_json,
            "scores": scores_json,
        }
        self._rows[id] = row
        return dict(row)

    def close(self) -> Path:
        """Write ``manifest.jsonl`` (sorted by id). Closing twice is harmless."""
        if not self._closed:
            _write_text_atomic(self.directory / MANIFEST, _manifest_text(self.rows))
            self._closed = True
        return self.directory


# ------------------------------------------------------------------------------------------------------------- merge


def _looks_like_set(path: Path) -> bool:
    if not path.is_dir():
        return False
    return (path / SET_INFO).exists() or (path / MANIFEST).exists() or not any(path.iterdir())


def _check_target(out_dir: Path, overwrite: bool, what: str = "synthetic set") -> None:
    if _is_work_name(out_dir.name):
        raise SyntheticSetError(f"{out_dir}: this name is reserved for temporary folders; choose another")
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if out_dir.is_dir() and not out_dir.is_symlink() and not any(out_dir.iterdir()):
        return  # an empty folder holds nothing to lose
    if not overwrite:
        raise SyntheticSetError(
            f"{what} {out_dir} already exists; pass overwrite=True to replace it (or remove it first)"
        )
    if what == "synthetic set" and not _looks_like_set(out_dir):
        raise SyntheticSetError(
            f"{out_dir} exists and is not a synthetic set (no {SET_INFO} or {MANIFEST}); "
            "refusing to replace it even with overwrite=True"
        )


def _place(tmp: Path, out_dir: Path, overwrite: bool, what: str = "synthetic set") -> None:
    """Rename the finished ``tmp`` to ``out_dir``; an old ``out_dir`` is moved aside first and restored on failure."""
    _check_target(out_dir, overwrite, what)
    if not out_dir.exists() and not out_dir.is_symlink():
        os.rename(tmp, out_dir)
        return
    old = _work_path(out_dir, "old")
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link ``src`` to ``dst`` (instant, and the source stays whole if a later step fails); copy otherwise."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _same_bytes(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    return a.read_bytes() == b.read_bytes()


def _set_info_json(set_info: Mapping[str, Any] | None, rows: Sequence[dict]) -> dict:
    from anomgen import __version__

    if set_info is not None and not isinstance(set_info, Mapping):
        raise SyntheticSetError(f"set_info must be a dict, got {type(set_info).__name__}")
    info = to_json_value(dict(set_info or {}), "set_info")
    generators = sorted({r["generator"] for r in rows})
    info = {
        "format_version": FORMAT_VERSION,
        "generator": info.pop("generator", generators[0] if len(generators) == 1 else generators),
        "config": info.pop("config", {}),
        "checkpoint": info.pop("checkpoint", None),
        "code_version": info.pop("code_version", __version__),
        "task": info.pop("task", {}),
        **{k: v for k, v in info.items() if k not in ("format_version", "counts", "created_at")},
        "counts": compute_counts(rows),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return info


def merge_shards(
    shard_dirs: Sequence[PathLike],
    out_dir: PathLike,
    set_info: Mapping[str, Any] | None,
    overwrite: bool = False,
) -> Path:
    """Merge closed shards into the finished set ``out_dir``, atomically; return ``out_dir``.

    Every id ends up exactly once. An id found in two shards with identical manifest rows and identical image (and
    mask) bytes is kept once (DDP samplers pad the last batch with repeated indices); differing content is an error.
    The set is built under a hidden sibling (``.<name>.tmp-<random>``) and renamed into place when complete. An
    existing ``out_dir`` is an error unless ``overwrite=True`` (an empty folder is simply replaced); then the new set
    is built first and swapped in, so that a failure never loses the old set. A folder that is not a synthetic set
    is never replaced. Files are hard-linked (or copied) out of the shards, and the shards are
    removed only after the set is in place, so a failed merge can be retried.
    """
    out_dir = Path(out_dir)
    shards = [Path(s) for s in shard_dirs]
    _check_target(out_dir, overwrite)
    out_abs = out_dir.absolute()
    for shard in shards:
        shard_abs = shard.absolute()
        if shard_abs == out_abs or out_abs in shard_abs.parents:
            raise SyntheticSetError(f"shard {shard} lies inside the output set {out_dir}; write shards beside it")

    # Collect rows, each id once.
    chosen: dict[str, tuple[dict, Path]] = {}
    for shard in shards:
        if not (shard / MANIFEST).is_file():
            raise SyntheticSetError(
                f"shard {shard} has no {MANIFEST}: it was never closed (SetWriter.close) or is not a shard"
            )
        for row in read_manifest(shard):
            for key in ("image", "mask"):
                if row[key] is not None and not (shard / row[key]).is_file():
                    raise SyntheticSetError(f"shard {shard}: sample {row['id']!r}: {key} file {row[key]} is missing")
            previous = chosen.get(row["id"])
            if previous is None:
                chosen[row["id"]] = (row, shard)
                continue
            prev_row, prev_shard = previous
            same = prev_row == row and _same_bytes(prev_shard / prev_row["image"], shard / row["image"])
            if same and row["mask"] is not None:
                same = _same_bytes(prev_shard / prev_row["mask"], shard / row["mask"])
            if not same:
                raise SyntheticSetError(
                    f"sample id {row['id']!r} appears in shards {prev_shard} and {shard} with different content; "
                    "each global index must be generated once (or deterministically, seeded by its index)"
                )
    if not chosen:
        raise SyntheticSetError(f"no samples to write to {out_dir}: the shards {[str(s) for s in shards]} are empty")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = _work_path(out_dir, "tmp")
    try:
        (tmp / IMAGES).mkdir(parents=True)
        (tmp / MASKS).mkdir()
        rows = []
        for sample_id in sorted(chosen, key=sort_key):
            src_row, shard = chosen[sample_id]
            row = dict(src_row)
            row["image"] = f"{IMAGES}/{sample_id}{Path(src_row['image']).suffix or '.png'}"
            _link_or_copy(shard / src_row["image"], tmp / row["image"])
            if src_row["mask"] is not None:
                row["mask"] = f"{MASKS}/{sample_id}{Path(src_row['mask']).suffix or '.png'}"
                _link_or_copy(shard / src_row["mask"], tmp / row["mask"])
            rows.append(row)
        _write_text_atomic(tmp / MANIFEST, _manifest_text(rows))
        info = _set_info_json(set_info, rows)
        _write_text_atomic(tmp / SET_INFO, json.dumps(info, indent=2, ensure_ascii=False) + "\n")
        _check_set(tmp, allow_work_name=True)
        _place(tmp, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for shard in shards:
        shutil.rmtree(shard, ignore_errors=True)
    return out_dir


def write_set(
    out_dir: PathLike,
    samples: Iterable[Mapping[str, Any]],
    set_info: Mapping[str, Any] | None,
    overwrite: bool = False,
) -> Path:
    """Write a whole set in one process, atomically; return ``out_dir``.

    ``samples`` yields dicts of :meth:`SetWriter.add` keyword arguments; a sample without ``"id"`` gets
    ``format_id(position)``. The samples go to a hidden temporary shard which is then merged into ``out_dir``
    (see :func:`merge_shards` for the overwrite rules). A failure leaves neither ``out_dir`` nor the shard behind.
    """
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)  # fail before generating anything
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    shard = _work_path(out_dir, "tmp")
    try:
        writer = SetWriter(shard)
        for position, sample in enumerate(samples):
            kwargs = dict(sample)
            kwargs.setdefault("id", format_id(position))
            writer.add(**kwargs)
        writer.close()
        return merge_shards([shard], out_dir, set_info, overwrite=overwrite)
    finally:
        shutil.rmtree(shard, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------------- check


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


def _check_set(path: Path, allow_work_name: bool = False) -> tuple[dict, list[dict]]:
    if not path.exists():
        raise SyntheticSetError(f"synthetic set folder not found: {path}")
    if not path.is_dir():
        raise SyntheticSetError(f"{path} is not a folder")
    if not allow_work_name and _is_work_name(path.name):
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
            if row[key] is not None and not (path / row[key]).is_file():
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


def check_set(path: PathLike) -> None:
    """Raise :class:`SyntheticSetError` naming what is missing or malformed when ``path`` is not a complete set."""
    _check_set(Path(path))


def is_complete_set(path: PathLike) -> bool:
    """Whether ``path`` is a complete, well-formed synthetic set (see :func:`check_set`)."""
    try:
        check_set(path)
    except SyntheticSetError:
        return False
    return True


# ----------------------------------------------------------------------------------------------------------- scores


def update_scores(set_dir: PathLike, scores: Mapping[str, Mapping[str, Any]]) -> None:
    """Merge ``scores[id]`` (e.g. ``{"eap": 0.7}``) into each row's ``"scores"``; rewrite the manifest atomically.

    An id that is not in the set is an error and nothing is written.
    """
    set_dir = Path(set_dir)
    _, rows = _check_set(set_dir)
    known = {r["id"] for r in rows}
    unknown = sorted((str(k) for k in scores if k not in known), key=sort_key)
    if unknown:
        raise SyntheticSetError(
            f"{set_dir}: scores given for id(s) not in the set: {', '.join(unknown[:10])}"
            + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
        )
    for row in rows:
        new = scores.get(row["id"])
        if new is None:
            continue
        if not isinstance(new, Mapping):
            raise SyntheticSetError(f"{set_dir}: scores of id {row['id']!r} must be a dict, got {new!r}")
        row["scores"].update(to_json_value(dict(new), f"scores[{row['id']}]"))
    _write_text_atomic(set_dir / MANIFEST, _manifest_text(rows))


def subset_set(
    set_dir: PathLike,
    ids: Iterable[str],
    out_dir: PathLike,
    set_info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """A new finished set holding the samples ``ids`` of ``set_dir`` (rows kept as they are, files hard-linked).

    Used to keep the best part of a set by a quality score. The new ``set.json`` is the parent's, updated with
    ``set_info`` and ``parent_set``; counts are recomputed. Atomic, with :func:`merge_shards`'s overwrite rules.
    """
    set_dir, out_dir = Path(set_dir), Path(out_dir)
    parent_info, rows = _check_set(set_dir)
    by_id = {r["id"]: r for r in rows}
    ids = list(dict.fromkeys(str(i) for i in ids))
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise SyntheticSetError(f"{set_dir}: subset asks for id(s) not in the set: {', '.join(unknown[:10])}")
    if not ids:
        raise SyntheticSetError(f"{set_dir}: an empty subset is not a set")
    _check_target(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    shard = _work_path(out_dir, "tmp")
    try:
        (shard / IMAGES).mkdir(parents=True)
        (shard / MASKS).mkdir()
        kept = [by_id[i] for i in sorted(ids, key=sort_key)]
        for row in kept:
            for key in ("image", "mask"):
                if row[key] is not None:
                    _link_or_copy(set_dir / row[key], shard / row[key])
        _write_text_atomic(shard / MANIFEST, _manifest_text(kept))
        info = {k: v for k, v in parent_info.items() if k not in ("counts", "created_at", "format_version")}
        info.update({"parent_set": str(set_dir.absolute()), **dict(set_info or {})})
        return merge_shards([shard], out_dir, info, overwrite=overwrite)
    finally:
        shutil.rmtree(shard, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------- reader


class SyntheticSet(RecordDataset):
    """A finished synthetic set as a dataset of records (checked with :func:`check_set` on construction).

    Each record has the set's image (resized to ``image_size`` if given), label, mask (zeros when the row has
    none), absolute ``image_path`` / ``mask_path`` (``""`` when none), category, ``source`` = the row's generator,
    and defect type. ``labels=(1,)`` keeps only anomalous rows. ``rows`` are the manifest rows, ``info`` is
    ``set.json`` and ``entries`` let task protocols filter without loading pixels.
    """

    name = "synthetic set"

    def __init__(
        self, root: PathLike, image_size: ImageSize = None, labels: int | Iterable[int] | None = None
    ) -> None:
        super().__init__(image_size)
        self.root = Path(root).absolute()
        info, rows = _check_set(self.root)
        if labels is not None:
            keep = {int(labels)} if isinstance(labels, int) else {int(v) for v in labels}
            bad = keep - {NORMAL, ANOMALOUS}
            if bad:
                raise SyntheticSetError(f"labels must be 0 and / or 1, got {sorted(bad)}")
            rows = [r for r in rows if r["label"] in keep]
        self.info: dict = info
        self.rows: list[dict] = rows
        self.entries = [
            Entry(
                image_path=str(self.root / r["image"]),
                label=r["label"],
                category=r["category"],
                defect_type=r["defect_type"],
                mask_path=None if r["mask"] is None else str(self.root / r["mask"]),
                source=r["generator"],
            )
            for r in rows
        ]

    @property
    def ids(self) -> list[str]:
        return [r["id"] for r in self.rows]


# ------------------------------------------------------------------------------------------------------ MVTec view


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
        array = _image_array(record["image"], f"normals: sample {index}")
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
    _, rows = _check_set(set_dir)
    categories = sorted({r["category"] for r in rows})
    if category is None:
        if len(categories) != 1:
            raise SyntheticSetError(
                f"{set_dir} holds several categories ({', '.join(categories)}); pass category= to pick one"
            )
        category = categories[0]
    _check_name(category, "category", "export_mvtec_view")
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
    _check_target(target, overwrite, what="MVTec view category folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = _work_path(target, "tmp")
    try:
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
        _place(tmp, target, overwrite, what="MVTec view category folder")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


__all__ = [
    "FORMAT_VERSION",
    "SetWriter",
    "SyntheticSet",
    "check_set",
    "compute_counts",
    "export_mvtec_view",
    "format_id",
    "is_complete_set",
    "merge_shards",
    "read_manifest",
    "read_set_info",
    "shard_path",
    "sort_key",
    "to_json_value",
    "update_scores",
    "write_set",
]
