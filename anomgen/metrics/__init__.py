"""Metrics of image anomaly detection: image/pixel AUROC, AP, F1Max and pixel AUPRO.

Plain functions (tensors in, floats out) live in :mod:`anomgen.metrics.functional`; the streaming, DDP-syncing
torchmetrics classes are re-exported here, with :func:`anomaly_metrics` to build the set a loop logs
(``image_AUROC``, ``pixel_AUPRO``, ...). Every metric has an exact mode (default) and a binned, memory-bounded
mode (``num_thresholds=K`` with ``score_range=(lo, hi)``).
"""

from anomgen.metrics.classification import AUROC, AveragePrecision, F1Max, F1MaxThreshold
from anomgen.metrics.collection import METRICS, anomaly_metrics
from anomgen.metrics.functional import (
    DEFAULT_NUM_THRESHOLDS,
    MissingClassError,
    aupro,
    auroc,
    average_precision,
    f1_max,
    pro_curve,
)
from anomgen.metrics.localization import AUPRO

__all__ = [
    "AUPRO",
    "AUROC",
    "DEFAULT_NUM_THRESHOLDS",
    "METRICS",
    "AveragePrecision",
    "F1Max",
    "F1MaxThreshold",
    "MissingClassError",
    "anomaly_metrics",
    "aupro",
    "auroc",
    "average_precision",
    "f1_max",
    "pro_curve",
]
