"""Score every anomaly of a synthetic set with a quality scorer and keep the best part as a new set.

The scorer (EAP by default) is fitted on features of the normal support images (y = 0) and of a few labelled real
anomalies (y = 1); each anomaly of the set gets its score in the manifest (``scores[key]``), and the top
``keep_fraction`` of the anomalies, with every normal row of the set, becomes a new set beside it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset

from anomgen.data.synthetic import SyntheticSet, read_manifest, subset_set, update_scores
from anomgen.encoders.base import extract_features


def _features(extractor, dataset: Dataset, batch_size: int, desc: str) -> np.ndarray:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    return extract_features(extractor, loader, desc).double().numpy()


def score_set(
    set_dir: str | Path,
    scorer,
    extractor,
    normals: Dataset,
    labelled_anomalies: Dataset,
    key: str = "eap",
    batch_size: int = 128,
) -> dict[str, float]:
    """Fit ``scorer`` on normals + labelled anomalies, score the set's anomalies, write ``scores[key]``."""
    if len(labelled_anomalies) == 0:
        raise ValueError("quality scoring needs labelled real anomalies (y = 1) to fit on; none were given")
    anomalies = SyntheticSet(set_dir, image_size=normals[0]["image"].shape[-2:], labels=(1,))
    x_normal = _features(extractor, normals, batch_size, "quality: normals")
    x_labelled = _features(extractor, labelled_anomalies, batch_size, "quality: labelled anomalies")
    x_aux = _features(extractor, anomalies, batch_size, "quality: set")
    X = np.concatenate([x_normal, x_labelled])
    y = np.concatenate([np.zeros(len(x_normal), int), np.ones(len(x_labelled), int)])
    values = scorer.fit(X, y).score_samples(x_aux)
    scores = {sample_id: float(v) for sample_id, v in zip(anomalies.ids, values)}
    update_scores(set_dir, {sample_id: {key: v} for sample_id, v in scores.items()})
    return scores


def select_top(
    set_dir: str | Path, out_dir: str | Path, key: str = "eap", keep_fraction: float = 1 / 3, overwrite: bool = False
) -> Path:
    """A new set with every normal row and the ``keep_fraction`` best-scored anomalies (``scores[key]``)."""
    if not 0.0 < keep_fraction <= 1.0:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}")
    rows = read_manifest(set_dir)
    anomalies = [r for r in rows if r["label"] == 1]
    unscored = [r["id"] for r in anomalies if key not in r["scores"]]
    if unscored:
        raise ValueError(f"{set_dir}: {len(unscored)} anomalies have no {key!r} score (e.g. {unscored[0]}); "
                         "score the set first")
    ranked = sorted(anomalies, key=lambda r: (-r["scores"][key], r["id"]))
    n_keep = max(1, math.ceil(keep_fraction * len(ranked)))
    ids = [r["id"] for r in rows if r["label"] == 0] + [r["id"] for r in ranked[:n_keep]]
    selection = {"score": key, "keep_fraction": keep_fraction, "kept": n_keep, "of": len(ranked)}
    return subset_set(set_dir, ids, out_dir, {"selection": selection}, overwrite=overwrite)
