"""AUPRO (area under the per-region-overlap curve up to an FPR limit) as a streaming torchmetrics ``Metric``.

``update(anomaly_maps, masks)``: maps ``(B,H,W)`` or ``(B,1,H,W)`` of real scores, masks ``(B,H,W)`` of 0/1.
Image sizes may change between updates. Regions (8-connected components) are labelled image by image at update
time, so no state ever needs to know which images another process saw:

* exact mode (``num_thresholds=None``): per pixel, the score and the size of the pixel's region (int32, 0 for a
  normal pixel) are appended to ``"cat"`` list states (~8 bytes a pixel for float32 maps); the number of regions
  is a ``"sum"`` state. ``compute()`` sorts all pixels once.
* binned mode (``num_thresholds=K``, ``score_range=(lo, hi)`` required as for the other binned metrics): three
  ``"sum"`` states -- normal-pixel counts per bin (int64, K), the per-bin sum of ``1 / region_size`` over region
  pixels (float64, K), and the number of regions. The reverse cumulative sum of the second vector at threshold k is
  the sum over regions of the fraction of the region at ``score >= t_k``, so every state is additive across
  batches and processes and memory is O(K) whatever the number of images or regions.

With no anomalous region, or no normal pixel, ``compute()`` returns NaN with a ``UserWarning``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

from anomgen.metrics import functional as F
from anomgen.metrics.classification import _cat_or_empty, _nan

__all__ = ["AUPRO"]


class AUPRO(Metric):
    """Normalised area under PRO(FPR) from FPR 0 to ``fpr_limit`` (default 0.3), in [0, 1]."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    metric_name = "AUPRO"

    def __init__(
        self,
        fpr_limit: float = 0.3,
        num_thresholds: int | None = None,
        score_range: Sequence[float] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.fpr_limit = F.check_fpr_limit(fpr_limit, self.metric_name)
        self.num_thresholds, self.score_range = F.check_binning(num_thresholds, score_range, self.metric_name)
        self.add_state("num_regions", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        if self.num_thresholds is None:
            self.add_state("maps", default=[], dist_reduce_fx="cat")
            self.add_state("region_sizes", default=[], dist_reduce_fx="cat")
        else:
            self._thresholds = F.streaming_thresholds(self.num_thresholds, self.score_range, self.metric_name)
            k = self.num_thresholds
            self.add_state("normal_counts", default=torch.zeros(k, dtype=torch.long), dist_reduce_fx="sum")
            self.add_state("pro_sums", default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")

    @property
    def thresholds(self) -> Tensor | None:
        """Binned mode's thresholds (float64, ascending), None in exact mode."""
        return None if self.num_thresholds is None else self._thresholds

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add anomaly maps ``(B,H,W)``/``(B,1,H,W)`` with their masks ``(B,H,W)``."""
        maps, masks = F.prepare_maps_masks(preds, target, self.metric_name)
        if self.num_thresholds is not None:
            F.check_in_range(maps, self.score_range, self.metric_name)
        sizes, n_regions = F.region_sizes(masks)
        self.num_regions += n_regions
        if self.num_thresholds is None:
            self.maps.append(maps.reshape(-1).clone())  # the caller may reuse its buffer for the next batch
            self.region_sizes.append(sizes.reshape(-1))
            return
        normal_counts, pro_sums = F.binned_pro_counts(maps, sizes, self._thresholds)
        self.normal_counts += normal_counts.to(self.normal_counts.device)
        self.pro_sums += pro_sums.to(self.pro_sums.device)

    def curve(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(fpr, pro, thresholds)`` of the local (unsynced) states, highest threshold first."""
        num_regions = int(self.num_regions)
        if self.num_thresholds is None:
            maps = _cat_or_empty(self.maps, torch.float32, self.device)
            sizes = _cat_or_empty(self.region_sizes, torch.int32, self.device)
            return F.exact_pro_curve(maps, sizes, num_regions, self.metric_name)
        return F.binned_pro_curve(self.normal_counts, self.pro_sums, num_regions, self._thresholds,
                                  self.metric_name)

    def compute(self) -> Tensor:
        try:
            fpr, pro, _ = self.curve()
        except F.MissingClassError as err:
            warnings.warn(f"{self.metric_name}: {err}; compute() returns NaN", UserWarning, stacklevel=2)
            return _nan(self.device)
        return torch.tensor(F.pro_area(fpr, pro, self.fpr_limit), dtype=torch.float32, device=self.device)
