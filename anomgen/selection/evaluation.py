"""Score a detector on a labelled dataset and summarise it as image metrics.

Per out-class figures group the anomalies by ``defect_type`` (an out-class of a multi-class task, a defect type of
an MVTec / VisA category): each group is scored against all the normals, giving the one-vs-one AUROCs, their mean
("one-vs-one average") and their minimum ("one-vs-one closest").
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from anomgen.data.record import ANOMALOUS, NORMAL
from anomgen.data.tasks import closest_out_class
from anomgen.metrics import auroc, average_precision, f1_max


def score_dataset(detector, dataset: Dataset, batch_size: int = 256, num_workers: int = 0):
    """Run ``detector.score`` over ``dataset``; returns (scores, labels, defect types) in dataset order."""
    labels: list[int] = []
    defects: list[str] = []

    def batches() -> Iterator[dict]:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
            labels.extend(int(v) for v in batch["label"])
            defects.extend(batch["defect_type"])
            yield batch

    scores = detector.score(batches())
    return scores, torch.tensor(labels), defects


def image_metrics(scores: torch.Tensor, labels: torch.Tensor, defect_types: list[str]) -> tuple[dict, dict]:
    """``({"image_AUROC", "image_AP", "image_F1Max", "image_F1Max_threshold", "image_AUROC_one_vs_one_mean",
    "image_AUROC_one_vs_one_closest", "closest_out_class"}, {out_class: AUROC})``.

    Raises :class:`~anomgen.errors.MetricError` when there is no normal or no anomalous sample.
    """
    if (labels == -1).any():
        raise ValueError("image_metrics: some labels are -1 (unknown); a task protocol must label the data first")
    f1, threshold = f1_max(scores, labels)
    out = {
        "image_AUROC": auroc(scores, labels),
        "image_AP": average_precision(scores, labels),
        "image_F1Max": f1,
        "image_F1Max_threshold": threshold,
    }
    normal = labels == NORMAL
    per_class = {}
    for d in dict.fromkeys(d for d, y in zip(defect_types, labels.tolist()) if y == ANOMALOUS):
        keep = normal | torch.tensor([t == d and y == ANOMALOUS for t, y in zip(defect_types, labels.tolist())])
        per_class[d] = auroc(scores[keep], labels[keep])
    if per_class:
        name, worst = closest_out_class(per_class)
        out["image_AUROC_one_vs_one_mean"] = sum(per_class.values()) / len(per_class)
        out["image_AUROC_one_vs_one_closest"] = worst
        out["closest_out_class"] = name
    return out, per_class
