"""Writing files and folders so that a reader never sees half of one, and the one JSON encoder of the project.

- :func:`write_atomic`: a file is either the old one or the whole new one.
- :func:`atomic_dir`: a folder is built under a hidden temporary sibling and renamed into place when complete.
- :func:`to_json`: plain JSON data from tensors, numpy values, paths and containers; ``strict=True`` refuses what
  has no faithful JSON form (the synthetic-set manifest), ``strict=False`` degrades it (metrics, reports).
- :func:`write_json`: :func:`to_json` + :func:`write_atomic`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike


def write_atomic(path: PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` through a temporary file in the same folder, synced, then
    ``os.replace``: the file is either the old one or the whole new one. Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:10]}"
    payload = data.encode("utf-8") if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# ------------------------------------------------------------------------------------------------------------ folders


def work_path(target: PathLike, kind: str = "tmp") -> Path:
    """A hidden sibling of ``target`` for work in progress: ``.<name>.<kind>-<pid>-<random>``."""
    target = Path(target)
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _occupied(path: Path) -> bool:
    """Whether ``path`` holds something to lose (an empty folder does not)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        return True
    return path.is_dir() and any(path.iterdir())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: PathLike, overwrite: bool = False, exist_ok: bool = False) -> Iterator[Path]:
    """Build the folder ``target`` atomically: yield a new hidden temporary sibling (``.<name>.tmp-<pid>-<random>``)
    to fill, and rename it onto ``target`` when the ``with`` block ends without an exception.

    - Any exception inside the block removes the temporary folder and leaves ``target`` as it was.
    - A missing ``target``, or an empty folder there, is simply replaced.
    - A ``target`` that holds something: with ``overwrite=True`` the old one is moved aside (``.<name>.old-...``),
      the new one renamed into place and the old one deleted; if that rename fails the old one is put back. With
      ``exist_ok=True`` the existing one is kept and the new one dropped (another process finished first: use it for
      folders whose content is a pure function of their name). Otherwise :class:`FileExistsError`.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = work_path(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        _place(tmp, target, overwrite, exist_ok)
    except BaseException:
        _remove(tmp)
        raise


def _place(tmp: Path, target: Path, overwrite: bool, exist_ok: bool) -> None:
    if _occupied(target) and overwrite:
        old = work_path(target, "old")
        os.rename(target, old)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(old, target)
            raise
        _remove(old)
        return
    try:
        os.rename(tmp, target)  # also replaces an empty folder
    except OSError:
        if not _occupied(target):
            raise
        if exist_ok:  # another process finished first
            _remove(tmp)
            return
        raise FileExistsError(f"{target} already exists; pass overwrite=True to replace it") from None


# --------------------------------------------------------------------------------------------------------------- JSON


def to_json(value: Any, strict: bool = False, key: str = "") -> Any:
    """``value`` as plain JSON data (dicts with string keys, lists, str, int, float, bool, None).

    Tensors and numpy arrays become (nested lists of) python numbers, one-element ones and numpy scalars a number;
    paths become strings; tuples lists. What has no faithful JSON form depends on ``strict``:

    - ``strict=False`` (metrics, reports): NaN and infinities become ``None``, non-string keys ``str(key)``, any other
      object ``str(value)``;
    - ``strict=True`` (the synthetic-set manifest): each of those is a :class:`ValueError` naming ``key``, the
      value's dotted path (``params.alpha``, ``scores[000042].eap``).
    """
    name = key or "<value>"
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        if strict:
            raise ValueError(f"{name}: {value} has no JSON form; use a finite number or None")
        return None
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                if strict:
                    raise ValueError(f"{name}: keys must be strings to survive JSON, got key {k!r} "
                                     f"({type(k).__name__})")
                k = str(k)
            out[k] = to_json(v, strict, f"{key}.{k}" if key else k)
        return out
    if isinstance(value, (list, tuple)):
        return [to_json(v, strict, f"{key}[{i}]") for i, v in enumerate(value)]
    item, tolist = getattr(value, "item", None), getattr(value, "tolist", None)
    if callable(tolist) and callable(item) and type(value).__module__.split(".")[0] in ("torch", "numpy"):
        if hasattr(value, "detach"):
            value = value.detach().cpu()
        return to_json(value.tolist(), strict, key)  # numpy scalars and 0-d tensors give a python number
    if strict:
        raise ValueError(f"{name}: value of type {type(value).__name__} is not JSON-serialisable; use numbers, "
                         "strings, booleans, None, lists, dicts, tensors or numpy values")
    return str(value)


def dumps(value: Any, strict: bool = False, **kwargs) -> str:
    """``json.dumps`` of :func:`to_json` (never NaN in the text: the output is standard JSON)."""
    return json.dumps(to_json(value, strict), allow_nan=False, ensure_ascii=False, **kwargs)


def write_json(path: PathLike, obj: Any, strict: bool = False) -> Path:
    """Write ``obj`` as indented, key-sorted JSON through :func:`to_json`, atomically; return the path."""
    return write_atomic(path, dumps(obj, strict, indent=2, sort_keys=True) + "\n")
