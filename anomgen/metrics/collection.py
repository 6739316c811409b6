"""One call that builds the metric set a validation/test loop logs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torchmetrics import Metric, MetricCollection

from anomgen.errors import MetricError
from anomgen.metrics.classification import AUROC, AveragePrecision, F1Max, F1MaxThreshold
from anomgen.metrics.localization import AUPRO

__all__ = ["METRICS", "anomaly_metrics"]

#: Metric names accepted by :func:`anomaly_metrics` and the classes behind them.
METRICS: dict[str, type[Metric]] = {
    "AUROC": AUROC,
    "AP": AveragePrecision,
    "F1Max": F1Max,
    "F1Threshold": F1MaxThreshold,
    "AUPRO": AUPRO,
}


def anomaly_metrics(
    names: Sequence[str] = ("AUROC", "AP", "F1Max"),
    prefix: str = "image_",
    num_thresholds: int | None = None,
    score_range: Sequence[float] | None = None,
    fpr_limit: float = 0.3,
    **metric_kwargs: Any,
) -> MetricCollection:
    """A ``MetricCollection`` keyed ``f"{prefix}{name}"``, e.g. ``image_AUROC``, ``image_AP``, ``image_F1Max``.

    ``anomaly_metrics(("AUROC", "AUPRO"), prefix="pixel_")`` gives ``pixel_AUROC`` and ``pixel_AUPRO`` (update it
    with maps and masks). ``num_thresholds`` / ``score_range`` select binned mode for every metric (see
    :mod:`anomgen.metrics.classification`); ``fpr_limit`` only concerns AUPRO; ``metric_kwargs`` go to every
    metric's ``torchmetrics.Metric`` constructor (e.g. ``sync_on_compute``).
    """
    if isinstance(names, str):
        names = (names,)
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise MetricError(f"unknown metric name(s) {unknown}; known: {sorted(METRICS)}")
    if len(set(names)) != len(names):
        raise MetricError(f"metric names repeat: {list(names)}")
    metrics: dict[str, Metric] = {}
    for name in names:
        kwargs = dict(num_thresholds=num_thresholds, score_range=score_range, **metric_kwargs)
        if name == "AUPRO":
            kwargs["fpr_limit"] = fpr_limit
        metrics[name] = METRICS[name](**kwargs)
    return MetricCollection(metrics, prefix=prefix)
