"""Writing synthetic sets: :class:`SetWriter` (samples into a shard), :func:`merge_shards` (shards into a finished set,
atomically), :func:`write_set` (both in one process), :func:`update_scores` and :func:`subset_set`.

Every finished set is built in a hidden temporary sibling folder by :func:`anomgen.files.atomic_dir` and renamed into
place only when complete and checked, so an interrupted run never leaves a folder that looks like a set.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from anomgen.data.generation import GeneratedBatch
from anomgen.data.record import ANOMALOUS, GOOD, NORMAL
from anomgen.data.synthetic.format import (
    FORMAT_VERSION,
    IMAGES,
    MANIFEST,
    MASKS,
    SET_INFO,
    PathLike,
    check_name,
    compute_counts,
    format_id,
    image_array,
    is_work_name,
    listed_file,
    load_set,
    manifest_text,
    mask_array,
    read_manifest,
    set_info_text,
    sort_key,
    to_json_value,
)
from anomgen.errors import SyntheticSetError
from anomgen.files import atomic_dir, work_path, write_atomic


class SetWriter:
    """Writes samples into a folder that is not (yet) a finished set: a whole set before merging, or one rank's shard.

    :meth:`add` writes one sample's PNG files at once, :meth:`add_batch` every sample of a
    :class:`~anomgen.data.generation.GeneratedBatch`; :meth:`close` writes ``manifest.jsonl`` sorted by id. A shard
    never gets ``set.json``: only :func:`merge_shards` makes a set. A folder that already holds files is refused unless
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
        check_name(id, "id", str(self.directory))
        if id in self._rows:
            raise SyntheticSetError(f"{context}: id already written to this folder; every id must be unique")
        if isinstance(label, bool) or label not in (NORMAL, ANOMALOUS):
            raise SyntheticSetError(f"{context}: label must be 0 (normal) or 1 (anomalous), got {label!r}")
        check_name(generator, "generator", context)
        check_name(category, "category", context)
        if defect_type is None:
            defect_type = GOOD if label == NORMAL else generator
        check_name(defect_type, "defect_type", context)
        if label == NORMAL and defect_type != GOOD:
            raise SyntheticSetError(f"{context}: a normal sample has defect_type {GOOD!r}, got {defect_type!r}")
        if label == ANOMALOUS and defect_type == GOOD:
            raise SyntheticSetError(f"{context}: an anomalous sample cannot have defect_type {GOOD!r}")
        if isinstance(sources, str):
            sources = [sources]
        source_list = [str(s) for s in sources]
        params_json = to_json_value(dict(params or {}), "params")
        scores_json = to_json_value(dict(scores or {}), "scores")

        pixels = image_array(image, context)
        mask_pixels = None if mask is None else mask_array(mask, pixels.shape[:2], context)
        if label == NORMAL and mask_pixels is not None and mask_pixels.any():
            raise SyntheticSetError(f"{context}: a normal sample cannot have defect pixels in its mask")

        image_rel = f"{IMAGES}/{id}.png"
        Image.fromarray(pixels).save(self.directory / image_rel, format="PNG")
        mask_rel = None
        if mask_pixels is not None:
            mask_rel = f"{MASKS}/{id}.png"
            Image.fromarray(mask_pixels).save(self.directory / mask_rel, format="PNG")

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

    def add_batch(self, batch: GeneratedBatch) -> list[dict]:
        """Write every sample of a generated batch (ids from its global indices); return their manifest rows."""
        if not isinstance(batch, GeneratedBatch):
            raise TypeError(f"SetWriter.add_batch takes a GeneratedBatch, got {type(batch).__name__}")
        return [self.add(**row) for row in batch.rows()]

    def close(self) -> Path:
        """Write ``manifest.jsonl`` (sorted by id). Closing twice is harmless."""
        if not self._closed:
            write_atomic(self.directory / MANIFEST, manifest_text(self.rows))
            self._closed = True
        return self.directory


# ------------------------------------------------------------------------------------------------------------- merge


def _looks_like_set(path: Path) -> bool:
    if not path.is_dir():
        return False
    return (path / SET_INFO).exists() or (path / MANIFEST).exists() or not any(path.iterdir())


def check_target(out_dir: Path, overwrite: bool, what: str = "synthetic set", how: str = "overwrite=True") -> None:
    """Whether a set (or a view's folder) may be written at ``out_dir``: missing or empty, or ``overwrite=True`` and
    (for a set) a synthetic set there; a :class:`SyntheticSetError` naming the folder otherwise (``how``: how the
    caller's user says overwrite=True)."""
    if is_work_name(out_dir.name):
        raise SyntheticSetError(f"{out_dir}: this name is reserved for temporary folders; choose another")
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if out_dir.is_dir() and not out_dir.is_symlink() and not any(out_dir.iterdir()):
        return  # an empty folder holds nothing to lose
    if not overwrite:
        raise SyntheticSetError(
            f"{what} {out_dir} already exists; pass {how} to replace it (or remove it first)"
        )
    if what == "synthetic set" and not _looks_like_set(out_dir):
        raise SyntheticSetError(
            f"{out_dir} exists and is not a synthetic set (no {SET_INFO} or {MANIFEST}); "
            "refusing to replace it even with overwrite=True"
        )


def remove_leftovers(out_dir: PathLike) -> list[Path]:
    """Remove what interrupted writes of the set ``out_dir`` left beside it: DDP shards (``.<name>.shard-*``) and
    temporary builds (``.<name>.tmp-*``); return them. Neither is ever a set, so both are safe to drop once no other
    process writes this set. A set moved aside while being replaced (``.<name>.old-*``) is kept: after an interrupted
    swap it may be the only copy of the old set."""
    out = Path(out_dir)
    stale = [p for kind in ("shard", "tmp") for p in sorted(out.parent.glob(f".{out.name}.{kind}-*"))
             if is_work_name(p.name)]
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    return stale


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


def _build_set(out_dir: Path, files: Sequence[tuple[dict, Path]], set_info: Mapping[str, Any] | None,
               overwrite: bool) -> Path:
    """The finished set ``out_dir`` from ``(row, folder its files lie in)`` pairs, sorted by id: files hard-linked
    (or copied) under ``images/<id>`` / ``masks/<id>``, manifest and set.json written, the whole checked, then
    renamed into place (:func:`anomgen.files.atomic_dir`)."""
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        (tmp / IMAGES).mkdir()
        (tmp / MASKS).mkdir()
        rows = []
        for src_row, folder in sorted(files, key=lambda pair: sort_key(pair[0]["id"])):
            row = dict(src_row)
            for key, sub in (("image", IMAGES), ("mask", MASKS)):
                if src_row[key] is not None:
                    row[key] = f"{sub}/{row['id']}{Path(src_row[key]).suffix or '.png'}"
                    _link_or_copy(folder / src_row[key], tmp / row[key])
            rows.append(row)
        write_atomic(tmp / MANIFEST, manifest_text(rows))
        write_atomic(tmp / SET_INFO, set_info_text(_set_info_json(set_info, rows)))
        load_set(tmp, allow_work_name=True)
        check_target(out_dir, overwrite)  # nothing appeared meanwhile that may not be replaced
    return out_dir


def merge_shards(
    shard_dirs: Sequence[PathLike],
    out_dir: PathLike,
    set_info: Mapping[str, Any] | None,
    overwrite: bool = False,
) -> Path:
    """Merge closed shards into the finished set ``out_dir``, atomically; return ``out_dir``.

    Every id ends up exactly once. An id found in two shards with identical manifest rows and identical image (and
    mask) bytes is kept once (DDP samplers pad the last batch with repeated indices); differing content is an error.
    The set is built under a hidden sibling (``.<name>.tmp-<pid>-<random>``) and renamed into place when complete. An
    existing ``out_dir`` is an error unless ``overwrite=True`` (an empty folder is simply replaced); then the new set
    is built first and swapped in, so that a failure never loses the old set. A folder that is not a synthetic set
    is never replaced. Files are hard-linked (or copied) out of the shards, and the shards are
    removed only after the set is in place, so a failed merge can be retried.
    """
    out_dir = Path(out_dir)
    shards = [Path(s) for s in shard_dirs]
    check_target(out_dir, overwrite)
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
                if row[key] is not None and not listed_file(shard, row, key).is_file():
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

    _build_set(out_dir, list(chosen.values()), set_info, overwrite)
    for shard in shards:
        shutil.rmtree(shard, ignore_errors=True)
    return out_dir


def write_set(
    out_dir: PathLike,
    samples: Iterable[Mapping[str, Any]] | GeneratedBatch,
    set_info: Mapping[str, Any] | None,
    overwrite: bool = False,
) -> Path:
    """Write a whole set in one process, atomically; return ``out_dir``.

    ``samples`` yields dicts of :meth:`SetWriter.add` keyword arguments (e.g. :meth:`GeneratedBatch.rows`), or is a
    :class:`~anomgen.data.generation.GeneratedBatch`; a sample without ``"id"`` gets ``format_id(position)``. The
    samples go to a hidden temporary shard which is then merged into ``out_dir`` (see :func:`merge_shards` for the
    overwrite rules). A failure leaves neither ``out_dir`` nor the shard behind.
    """
    out_dir = Path(out_dir)
    check_target(out_dir, overwrite)  # fail before generating anything
    if isinstance(samples, GeneratedBatch):
        samples = samples.rows()
    shard = work_path(out_dir, "tmp")
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


# ----------------------------------------------------------------------------------------------------------- scores


def update_scores(set_dir: PathLike, scores: Mapping[str, Mapping[str, Any]]) -> None:
    """Merge ``scores[id]`` (e.g. ``{"eap": 0.7}``) into each row's ``"scores"``; rewrite the manifest atomically.

    An id that is not in the set is an error and nothing is written.
    """
    set_dir = Path(set_dir)
    _, rows = load_set(set_dir)
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
    write_atomic(set_dir / MANIFEST, manifest_text(rows))


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
    parent_info, rows = load_set(set_dir)
    by_id = {r["id"]: r for r in rows}
    ids = list(dict.fromkeys(str(i) for i in ids))
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise SyntheticSetError(f"{set_dir}: subset asks for id(s) not in the set: {', '.join(unknown[:10])}")
    if not ids:
        raise SyntheticSetError(f"{set_dir}: an empty subset is not a set")
    check_target(out_dir, overwrite)
    info = {k: v for k, v in parent_info.items() if k not in ("counts", "created_at", "format_version")}
    info.update({"parent_set": str(set_dir.absolute()), **dict(set_info or {})})
    return _build_set(out_dir, [(by_id[i], set_dir) for i in ids], info, overwrite)
