"""Metrics of image anomaly detection: image/pixel AUROC, AP, F1Max and pixel AUPRO.

Plain functions (tensors in, floats out) live in :mod:`anomgen.metrics.functional`; the streaming, DDP-syncing
torchmetrics classes are re-exported here, with :func:`anomaly_metrics` to build the set a loop logs
(``image_AUROC``, ``pixel_AUPRO``, ...). Every metric has an exact mode (default) and a binned, memory-bounded
mode (``num_thresholds=K`` with ``score_range=(lo, hi)``).

Generation quality (FID, KID, density and coverage of a generated set, in any feature space; Inception Score and
IC-LPIPS, with :func:`generation_metrics` over a synthetic set folder) lives in :mod:`anomgen.metrics.generation` and
is re-exported here too.
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
from anomgen.metrics.generation import (
    FID,
    KID,
    ClusterDiversity,
    DensityCoverage,
    InceptionScore,
    density_coverage,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    generation_metrics,
    ic_lpips,
    inception_score_from_logits,
    kid_from_features,
)
from anomgen.metrics.localization import AUPRO

__all__ = [
    "AUPRO",
    "AUROC",
    "DEFAULT_NUM_THRESHOLDS",
    "FID",
    "KID",
    "METRICS",
    "AveragePrecision",
    "ClusterDiversity",
    "DensityCoverage",
    "F1Max",
    "F1MaxThreshold",
    "InceptionScore",
    "MissingClassError",
    "anomaly_metrics",
    "aupro",
    "auroc",
    "average_precision",
    "density_coverage",
    "f1_max",
    "feature_statistics",
    "fid_from_features",
    "frechet_distance",
    "generation_metrics",
    "ic_lpips",
    "inception_score_from_logits",
    "kid_from_features",
    "pro_curve",
]
