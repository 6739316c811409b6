"""A feature cache: each (image, extractor) pair is computed at most once, in memory and optionally on disk.

Images are keyed by the record's ``image_path`` (a file, a synthetic set's PNG, or a stable id such as
``sklearn-digits:00042``), extractors by a name. The contract: one name is one extractor (weights and
preprocessing), and one path is one image (the same ``image_size`` in every dataset passed to one cache). With a
``directory``, every extractor's features live in one file ``<directory>/<name>-<hash>.pt``, written atomically
and reloaded by a later cache; a file made by another extractor under the same name (its fingerprint: class,
plain settings and weights) is replaced, with a warning.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from anomgen.data.record import Entry
from anomgen.errors import DatasetError
from anomgen.pretrained import load_torch_file

CACHE_FORMAT = "anomgen.feature_cache/1"


# ------------------------------------------------------------------------------------------------ dataset entries


def dataset_entries(dataset: Dataset) -> list[Entry] | None:
    """The :class:`Entry` rows of ``dataset`` without loading pixels: its ``entries``, or those of the parts of a
    ``ConcatDataset`` / ``Subset`` that have them; ``None`` when they cannot be known without loading records."""
    entries = getattr(dataset, "entries", None)
    if entries is not None:
        return list(entries)
    if isinstance(dataset, Subset):
        parent = dataset_entries(dataset.dataset)
        return None if parent is None else [parent[int(i)] for i in dataset.indices]
    if isinstance(dataset, ConcatDataset):
        parts = [dataset_entries(d) for d in dataset.datasets]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]
    return None


class EntryView(Dataset):
    """``dataset`` with ``entries`` read from its records (each record loaded once, here)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.entries = []
        for i in range(len(dataset)):
            r = dataset[i]
            self.entries.append(Entry(str(r["image_path"]), int(r["label"]), str(r["category"]),
                                      str(r["defect_type"]), r.get("mask_path") or None, str(r["source"])))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.dataset[index]


def with_entries(dataset: Dataset) -> Dataset:
    """``dataset`` itself when :func:`dataset_entries` knows its entries, else an :class:`EntryView` of it."""
    return dataset if dataset_entries(dataset) is not None else EntryView(dataset)


def check_image_paths(paths: list[str], what: str = "dataset") -> None:
    """Image paths key the cache: each must be a non-empty string, and unique within one dataset."""
    seen: set[str] = set()
    for i, p in enumerate(paths):
        if not isinstance(p, str) or not p:
            raise DatasetError(f"{what}: sample {i} has no image_path ({p!r}); the feature cache keys images by it")
        if p in seen:
            raise DatasetError(f"{what}: image_path {p!r} occurs more than once (sample {i}); the feature cache "
                               "needs one image per path")
        seen.add(p)


# ----------------------------------------------------------------------------------------------------- fingerprint


def extractor_fingerprint(extractor: nn.Module) -> str:
    """SHA-256 of an extractor's classes, plain settings (numbers, strings, tuples) and weights (state dict)."""
    digest = hashlib.sha256()
    plain = (bool, int, float, str, type(None), tuple)
    for prefix, module in extractor.named_modules():
        settings = sorted((k, repr(v)) for k, v in vars(module).items()
                          if not k.startswith("_") and k != "training" and isinstance(v, plain))
        digest.update(repr((prefix, type(module).__qualname__, settings)).encode())
    for key, tensor in extractor.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(repr((key, tuple(t.shape), str(t.dtype))).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------------ cache


@dataclass
class _Store:
    """The features of one extractor: rows in ``chunks`` (concatenated on demand), ``index`` path -> row."""

    paths: list[str] = field(default_factory=list)
    index: dict[str, int] = field(default_factory=dict)
    chunks: list[torch.Tensor] = field(default_factory=list)
    fingerprint: str | None = None
    unsaved: int = 0

    def matrix(self) -> torch.Tensor:
        if len(self.chunks) > 1:
            self.chunks = [torch.cat(self.chunks)]
        return self.chunks[0] if self.chunks else torch.empty(0, 0)

    def add(self, paths: list[str], feats: torch.Tensor) -> None:
        for p in paths:
            self.index[p] = len(self.paths)
            self.paths.append(p)
        self.chunks.append(feats)
        self.unsaved += len(paths)


class FeatureCache:
    """Features of (image, extractor) pairs, each computed at most once.

    ``features(name, extractor, dataset)`` returns N × D float32 CPU features in dataset order, computing only the
    images not seen before (in batches, under ``torch.no_grad``, on ``device`` or the extractor's own device).
    ``num_computed`` / ``num_hits`` count, per extractor name, images computed and images served from the cache.
    With a ``directory``, an extractor's file is written when ``save_every`` new rows have accumulated and by
    :meth:`save`; a new cache reloads it on first use of that name.
    """

    def __init__(self, directory: str | os.PathLike | None = None, device: str | torch.device | None = None,
                 save_every: int = 4096, num_workers: int = 0) -> None:
        self.directory = None if directory is None else Path(directory)
        self.device = None if device is None else torch.device(device)
        self.save_every = int(save_every)
        self.num_workers = int(num_workers)
        self.num_computed: dict[str, int] = {}
        self.num_hits: dict[str, int] = {}
        self._stores: dict[str, _Store] = {}

    def stats(self) -> dict[str, dict[str, int]]:
        """``{name: {"computed", "hits", "stored"}}`` for every extractor used."""
        return {n: {"computed": self.num_computed.get(n, 0), "hits": self.num_hits.get(n, 0),
                    "stored": len(s.paths)} for n, s in self._stores.items()}

    def stored_paths(self, extractor_name: str) -> list[str]:
        """The image paths whose features are held for ``extractor_name``, in storage order."""
        store = self._stores.get(extractor_name)
        return [] if store is None else list(store.paths)

    def file(self, extractor_name: str) -> Path:
        """Where the features of ``extractor_name`` are stored (a readable, collision-free file name)."""
        if self.directory is None:
            raise ValueError("this FeatureCache has no directory")
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", extractor_name).strip("._")[:80] or "extractor"
        return self.directory / f"{safe}-{hashlib.sha1(extractor_name.encode()).hexdigest()[:8]}.pt"

    def _store(self, name: str, extractor: nn.Module) -> _Store:
        store = self._stores.get(name)
        if store is not None:
            return store
        store = _Store()
        if self.directory is not None:
            store.fingerprint = extractor_fingerprint(extractor)
            file = self.file(name)
            if file.is_file():
                saved = load_torch_file(file, "feature cache file")
                if not isinstance(saved, dict) or saved.get("format") != CACHE_FORMAT or saved.get("name") != name:
                    raise ValueError(f"{file} is not a feature cache file of extractor {name!r} "
                                     f"(format {CACHE_FORMAT!r})")
                if saved["fingerprint"] == store.fingerprint:
                    if saved["paths"]:
                        store.add(list(saved["paths"]), saved["features"].float())
                    store.unsaved = 0
                else:
                    warnings.warn(f"feature cache {file} was made by another extractor named {name!r} (other "
                                  "settings or weights); its features are recomputed and the file replaced",
                                  stacklevel=3)
        self._stores[name] = store
        self.num_computed.setdefault(name, 0)
        self.num_hits.setdefault(name, 0)
        return store

    def _device(self, extractor: nn.Module) -> torch.device:
        if self.device is not None:
            return self.device
        for tensor in (*extractor.parameters(), *extractor.buffers()):
            return tensor.device
        return torch.device("cpu")

    @torch.no_grad()
    def features(self, extractor_name: str, extractor: nn.Module, dataset: Dataset,
                 batch_size: int = 256) -> torch.Tensor:
        """Features (N × D) of every image of ``dataset`` (records), in order, computing only unseen ones."""
        from anomgen.progress import progress

        what = f"{type(dataset).__name__} ({extractor_name})"
        if len(dataset) == 0:
            raise DatasetError(f"{what}: no images")
        store = self._store(extractor_name, extractor)
        if self.device is not None:
            extractor.to(self.device)
        extractor.eval()
        device = self._device(extractor)
        entries = dataset_entries(dataset)
        if entries is not None:
            if len(entries) != len(dataset):
                raise DatasetError(f"{what}: {len(entries)} entries for {len(dataset)} samples")
            paths = [e.image_path for e in entries]
            check_image_paths(paths, what)
            missing = [i for i, p in enumerate(paths) if p not in store.index]
            source: Dataset | None = Subset(dataset, missing) if missing else None
            expected = iter([paths[i] for i in missing])
        else:  # the paths are known only by loading the records: one pass computes what is missing
            paths, source, expected = [], dataset, None
        computed = 0
        if source is not None:
            loader = DataLoader(source, batch_size=batch_size, shuffle=False, num_workers=self.num_workers)
            for batch in progress(loader, desc=f"{extractor_name}: features", total=len(loader)):
                batch_paths = [str(p) for p in batch["image_path"]]
                if expected is not None:
                    wanted = [next(expected) for _ in batch_paths]
                    if batch_paths != wanted:
                        raise DatasetError(f"{what}: records' image_path {batch_paths[:3]} differ from its entries' "
                                           f"{wanted[:3]}")
                else:
                    paths += batch_paths
                    check_image_paths(paths, what)
                todo = [j for j, p in enumerate(batch_paths) if p not in store.index]
                if not todo:
                    continue
                feats = extractor(batch["image"][todo].to(device))
                self._check_features(feats, len(todo), store, extractor_name, batch_paths[todo[0]])
                store.add([batch_paths[j] for j in todo], feats.detach().float().cpu())
                computed += len(todo)
        self.num_computed[extractor_name] += computed
        self.num_hits[extractor_name] += len(paths) - computed
        if self.directory is not None and store.unsaved >= self.save_every:
            self._save(extractor_name, store)
        rows = torch.tensor([store.index[p] for p in paths], dtype=torch.long)
        return store.matrix()[rows]

    @staticmethod
    def _check_features(feats: torch.Tensor, n: int, store: _Store, name: str, first_path: str) -> None:
        if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[0] != n:
            shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
            raise ValueError(f"extractor {name!r} must return {n} × D features for {n} images, got {shape}")
        if store.chunks and feats.shape[1] != store.chunks[0].shape[1]:
            raise ValueError(f"extractor {name!r} returned {feats.shape[1]}-d features, its cached features are "
                             f"{store.chunks[0].shape[1]}-d: one name must be one extractor")
        if not torch.isfinite(feats).all():
            raise ValueError(f"extractor {name!r} returned NaN or infinite features (batch starting at {first_path})")

    def save(self) -> list[Path]:
        """Write every extractor's features that changed since the last write; returns the files written."""
        if self.directory is None:
            return []
        return [self._save(n, s) for n, s in self._stores.items() if s.unsaved]

    def _save(self, name: str, store: _Store) -> Path:
        file = self.file(name)
        file.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": CACHE_FORMAT, "name": name, "fingerprint": store.fingerprint,
                   "paths": list(store.paths), "features": store.matrix().clone()}
        tmp = file.parent / f".{file.name}.tmp-{uuid.uuid4().hex[:10]}"
        try:
            torch.save(payload, tmp)
            os.replace(tmp, file)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        store.unsaved = 0
        return file


__all__ = ["EntryView", "FeatureCache", "check_image_paths", "dataset_entries", "extractor_fingerprint",
           "with_entries"]
