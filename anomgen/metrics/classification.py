"""Streaming image/pixel detection metrics as torchmetrics ``Metric`` classes: AUROC, AP, F1Max.

``update(preds, target)`` takes image scores ``(B,)`` with labels ``(B,)`` (0 normal, 1 anomalous), or pixel maps
``(B,H,W)`` / ``(B,1,H,W)`` with masks ``(B,H,W)`` (flattened: every pixel is a sample). Scores are any finite real
numbers (no sigmoid is applied).

Modes (``num_thresholds``):

* ``None`` (default) -- exact. The states are the lists of scores and labels (``dist_reduce_fx="cat"``), so memory
  grows with the data (pixel metrics: ~5 bytes a pixel).
* ``K`` -- binned. The states are two ``K``-long count vectors (``dist_reduce_fx="sum"``) over ``K`` thresholds
  linearly spaced over ``score_range=(lo, hi)``, which is **required**: a stream cannot know its range in advance,
  and fixing it from the first batch would silently clip later ones. An ``update`` with a score outside the range
  raises :class:`~anomgen.errors.MetricError` naming the scores' range -- rescale the scores (e.g. a detector's
  normalised maps live in [0, 1]) or use exact mode. :data:`~anomgen.metrics.functional.DEFAULT_NUM_THRESHOLDS`
  agrees with exact mode to 1e-3 on realistic maps.

Degenerate data: if everything seen has no anomalous sample (or no normal one), ``compute()`` returns NaN and
emits a ``UserWarning`` naming the metric, so that a loop validating on normal-only data does not crash. Invalid
input (labels other than 0/1 such as -1, NaN scores, mismatched shapes, out-of-range scores in binned mode) always
raises :class:`~anomgen.errors.MetricError`.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from anomgen.metrics import functional as F

__all__ = ["AUROC", "AveragePrecision", "F1Max", "F1MaxThreshold"]


def _nan(device: torch.device) -> Tensor:
    return torch.tensor(float("nan"), dtype=torch.float32, device=device)


def _cat_or_empty(state: list[Tensor] | Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    if isinstance(state, list) and not state:
        return torch.empty(0, dtype=dtype, device=device)
    return dim_zero_cat(state)


class _ScoreLabelMetric(Metric):
    """Shared states and curve of the score-vs-label metrics (exact or binned)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    metric_name = "metric"

    def __init__(
        self,
        num_thresholds: int | None = None,
        score_range: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.num_thresholds, self.score_range = F.check_binning(num_thresholds, score_range, self.metric_name)
        if self.num_thresholds is None:
            self.add_state("scores", default=[], dist_reduce_fx="cat")
            self.add_state("labels", default=[], dist_reduce_fx="cat")
        else:
            self._thresholds = F.streaming_thresholds(self.num_thresholds, self.score_range, self.metric_name)
            k = self.num_thresholds
            self.add_state("pos_counts", default=torch.zeros(k, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state("neg_counts", default=torch.zeros(k, dtype=torch.long), dist_reduce_fx="sum")

    @property
    def thresholds(self) -> Tensor | None:
        """Binned mode's thresholds (float64, ascending), None in exact mode."""
        return None if self.num_thresholds is None else self._thresholds

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add scores ``(B,)`` with labels ``(B,)``, or maps ``(B,[1,]H,W)`` with masks ``(B,H,W)``."""
        scores, labels = F.prepare_scores_labels(preds, target, self.metric_name)
        if self.num_thresholds is None:
            # copies: the caller may reuse its buffers for the next batch
            self.scores.append(scores.clone())
            self.labels.append(labels.clone())
            return
        F.check_in_range(scores, self.score_range, self.metric_name)
        pos, neg = F.binned_counts(scores, labels, self._thresholds)
        self.pos_counts += pos.to(self.pos_counts.device)
        self.neg_counts += neg.to(self.neg_counts.device)

    def curve(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(thresholds, tps, fps)`` of the local (unsynced) states, highest threshold first: at ``thresholds[i]``,
        ``tps[i]`` anomalous and ``fps[i]`` normal samples have ``score >= thresholds[i]``."""
        if self.num_thresholds is None:
            scores = _cat_or_empty(self.scores, torch.float32, self.device)
            labels = _cat_or_empty(self.labels, torch.bool, self.device)
            if scores.numel() == 0:
                raise F.MissingClassError(f"{self.metric_name} is undefined: no samples (update was never called)")
            return F.exact_curve(scores, labels)
        return F.binned_curve(self.pos_counts, self.neg_counts, self._thresholds)

    def _value(self, thresholds: Tensor, tps: Tensor, fps: Tensor) -> float:
        raise NotImplementedError

    def compute(self) -> Tensor:
        try:
            value = self._value(*self.curve())
        except F.MissingClassError as err:
            warnings.warn(f"{self.metric_name}: {err}; compute() returns NaN", UserWarning, stacklevel=2)
            return _nan(self.device)
        return torch.tensor(value, dtype=torch.float32, device=self.device)


class AUROC(_ScoreLabelMetric):
    """Area under the ROC curve (image-level on scores/labels, pixel-level on maps/masks)."""

    metric_name = "AUROC"

    def _value(self, thresholds: Tensor, tps: Tensor, fps: Tensor) -> float:
        return F.auroc_from_curve(tps, fps, self.metric_name)


class AveragePrecision(_ScoreLabelMetric):
    """Average precision with anomalous as the positive class (key ``"AP"`` in :func:`anomaly_metrics`)."""

    metric_name = "AP"

    def _value(self, thresholds: Tensor, tps: Tensor, fps: Tensor) -> float:
        return F.average_precision_from_curve(tps, fps, self.metric_name)


class F1Max(_ScoreLabelMetric):
    """Best F1 over the precision-recall curve; ``compute()`` returns the F1.

    The threshold reaching it is stored by ``compute()`` in :attr:`threshold` (a 0-d float64 tensor; NaN before
    the first compute, after ``reset()``, and when the F1 is NaN). ``score >= threshold`` predicts anomalous.
    ``forward()`` (a batch value) leaves :attr:`threshold` untouched, so it always belongs to the accumulated data.
    Under DDP every process gets the same threshold (compute syncs the states first). To log the threshold as a
    metric use :class:`F1MaxThreshold`.
    """

    metric_name = "F1Max"

    def __init__(self, num_thresholds: int | None = None, score_range: Sequence[float] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(num_thresholds=num_thresholds, score_range=score_range, **kwargs)
        self.threshold = torch.tensor(float("nan"), dtype=torch.float64)

    def _value(self, thresholds: Tensor, tps: Tensor, fps: Tensor) -> float:
        f1, threshold = F.f1_max_from_curve(thresholds, tps, fps, self.metric_name)
        self.threshold = torch.tensor(threshold, dtype=torch.float64)
        return f1

    def compute(self) -> Tensor:
        self.threshold = torch.tensor(float("nan"), dtype=torch.float64)
        return super().compute()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        threshold = self.threshold
        try:
            return super().forward(*args, **kwargs)
        finally:
            self.threshold = threshold

    def reset(self) -> None:
        super().reset()
        self.threshold = torch.tensor(float("nan"), dtype=torch.float64)


class F1MaxThreshold(F1Max):
    """The threshold of :class:`F1Max` as a metric (``compute()`` returns it), e.g. to log next to the F1."""

    metric_name = "F1Threshold"
    higher_is_better = None

    def compute(self) -> Tensor:
        super().compute()
        return self.threshold.to(torch.float32).to(self.device)
