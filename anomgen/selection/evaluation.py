"""Score a detector on a labelled dataset and summarise it as image metrics and, for a detector with anomaly maps,
pixel metrics.

Per out-class figures group the anomalies by ``defect_type`` (an out-class of a multi-class task, a defect type of
an MVTec / VisA category): each group is scored against all the normals, giving the one-vs-one AUROCs, their mean
("one-vs-one average") and their minimum ("one-vs-one closest").

A detector has anomaly maps when it has ``score_maps(batches)`` (N × H × W, higher = more anomalous). It may also have
``predict(batches) -> (image scores, maps)``, which gives both from one pass of the model (WinCLIP's); without it
the image scores come from ``score`` and the maps from ``score_maps``. Both are called one record batch at a time
(a batch's scores and maps must not depend on the other batches), so that only one batch of maps is held at a time
and :class:`PixelMetrics` accumulates them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from anomgen.data.record import ANOMALOUS, NORMAL
from anomgen.data.tasks import closest_out_class
from anomgen.errors import MetricError
from anomgen.metrics import AUPRO, AUROC, MissingClassError, auroc, average_precision, f1_max
from anomgen.metrics import functional as MF

#: the keys :meth:`PixelMetrics.compute` gives (with ``pixel_undefined``, the reason, when they are undefined)
PIXEL_KEYS = ("pixel_AUROC", "pixel_AP", "pixel_F1Max", "pixel_F1Max_threshold", "pixel_AUPRO")


def has_anomaly_maps(detector) -> bool:
    """Whether ``detector`` gives pixel anomaly maps (it has ``score_maps``)."""
    return callable(getattr(detector, "score_maps", None))


def dataset_has_masks(dataset: Dataset) -> bool | None:
    """Whether some sample of ``dataset`` has a ground-truth mask file (``None``: the dataset has no ``entries`` to
    say it without loading; the records then tell, by their ``mask_path``)."""
    entries = getattr(dataset, "entries", None)
    if entries is None:
        return None
    return any(e.mask_path for e in entries)


def scores_and_maps(detector, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """One record batch's (image scores B, anomaly maps B × H × W): ``detector.predict([batch])`` when it has
    ``predict`` (one pass of the model for both), else ``score([batch])`` and ``score_maps([batch])``."""
    if callable(getattr(detector, "predict", None)):
        scores, maps = detector.predict([batch])
    else:
        scores, maps = detector.score([batch]), detector.score_maps([batch])
    return torch.as_tensor(scores), torch.as_tensor(maps)


class PixelMetrics:
    """Pixel AUROC, AP, F1-max (with its threshold) and AUPRO (FPR up to ``fpr_limit``) of anomaly maps against the
    records' masks, fed one batch at a time (:meth:`update`), computed once (:meth:`compute`).

    The states are those of :class:`~anomgen.metrics.AUROC` (whose one curve gives AUROC, AP and F1-max) and
    :class:`~anomgen.metrics.AUPRO`: exact with ``num_thresholds=None`` (every pixel kept, about 13 bytes a pixel),
    binned with ``num_thresholds=K`` and ``score_range=(lo, hi)`` (a few K-long vectors whatever the number of
    images; a map value outside the range is an error, never clipped). Maps of another size than the masks are
    resized bilinearly to the masks' size, with a warning. A record without a mask file counts as all normal pixels
    (its mask is zeros); an anomalous one is warned about. With no record with a mask file, :meth:`compute` gives
    ``{}``; with no anomalous (or no normal) pixel it warns and gives NaN values with ``pixel_undefined``, the
    reason: the metrics are undefined, not a number.
    """

    def __init__(self, num_thresholds: int | None = None, score_range: Sequence[float] | None = None,
                 fpr_limit: float = 0.3, name: str = "detector") -> None:
        self.name = name
        self.curve_metric = AUROC(num_thresholds=num_thresholds, score_range=score_range)
        self.pro_metric = AUPRO(fpr_limit=fpr_limit, num_thresholds=num_thresholds, score_range=score_range)
        self.num_images = self.num_masks = self.anomalies_without_mask = 0
        self.num_pixels = self.num_anomalous_pixels = 0
        self.resized_from: tuple[int, int] | None = None

    def update(self, maps: torch.Tensor, batch: dict) -> None:
        """Add one batch's maps (B × H × W or B × 1 × H × W) against its records' ``mask`` (B × H × W)."""
        masks = batch["mask"]
        maps = torch.as_tensor(maps).detach().cpu()
        if maps.dim() == 4 and maps.shape[1] == 1:
            maps = maps.squeeze(1)
        if maps.dim() != 3 or maps.shape[0] != masks.shape[0]:
            raise ValueError(f"{self.name}: anomaly maps of shape {tuple(maps.shape)} for {masks.shape[0]} masks of "
                             f"{tuple(masks.shape[-2:])}; expected B × H × W")
        if maps.shape[-2:] != masks.shape[-2:]:
            if self.resized_from is None:
                warnings.warn(f"{self.name}: anomaly maps of {tuple(maps.shape[-2:])} resized bilinearly to the "
                              f"masks' {tuple(masks.shape[-2:])} for the pixel metrics", UserWarning, stacklevel=2)
            self.resized_from = tuple(maps.shape[-2:])
            maps = F.interpolate(maps[:, None].float(), size=tuple(masks.shape[-2:]), mode="bilinear",
                                 align_corners=False, antialias=True)[:, 0]
        with_mask = [bool(p) for p in batch["mask_path"]]
        self.num_images += len(with_mask)
        self.num_masks += sum(with_mask)
        self.anomalies_without_mask += sum(1 for m, y in zip(with_mask, batch["label"].tolist())
                                           if y == ANOMALOUS and not m)
        self.num_pixels += masks.numel()
        self.num_anomalous_pixels += int((masks > 0).sum())
        try:
            self.curve_metric.update(maps, masks)
            self.pro_metric.update(maps, masks)
        except MetricError as err:  # e.g. a map value outside binned mode's range: say whose maps
            raise MetricError(f"{self.name}'s anomaly maps: {err}") from err

    def describe(self) -> dict:
        """How the figures were made: mode, thresholds, range, FPR limit, counts, the maps' size if resized."""
        k = self.curve_metric.num_thresholds
        return {"mode": "exact" if k is None else "binned", "num_thresholds": k,
                "score_range": None if k is None else list(self.curve_metric.score_range),
                "fpr_limit": self.pro_metric.fpr_limit, "num_images": self.num_images, "num_masks": self.num_masks,
                "num_pixels": self.num_pixels, "num_anomalous_pixels": self.num_anomalous_pixels,
                "maps_resized_from": None if self.resized_from is None else list(self.resized_from)}

    def compute(self) -> dict:
        """``{pixel_AUROC, pixel_AP, pixel_F1Max, pixel_F1Max_threshold, pixel_AUPRO}`` (floats); ``{}`` when no
        record had a mask file; NaN values and ``pixel_undefined`` (why) when no pixel is anomalous (or none
        normal)."""
        if self.num_masks == 0:
            return {}
        if self.anomalies_without_mask:
            warnings.warn(f"{self.name}: {self.anomalies_without_mask} anomalous image(s) have no mask file; their "
                          "pixels count as normal in the pixel metrics", UserWarning, stacklevel=2)
        try:
            thresholds, tps, fps = self.curve_metric.curve()
            f1, threshold = MF.f1_max_from_curve(thresholds, tps, fps, "pixel F1Max")
            out = {"pixel_AUROC": MF.auroc_from_curve(tps, fps, "pixel AUROC"),
                   "pixel_AP": MF.average_precision_from_curve(tps, fps, "pixel AP"),
                   "pixel_F1Max": f1, "pixel_F1Max_threshold": threshold}
            fpr, pro, _ = self.pro_metric.curve()
        except MissingClassError:
            missing = "anomalous pixel (mask 1)" if self.num_anomalous_pixels == 0 else "normal pixel (mask 0)"
            reason = (f"no {missing} in the {self.num_images} test masks ({self.num_masks} from mask files): "
                      f"{', '.join(PIXEL_KEYS)} are undefined")
            warnings.warn(f"{self.name}: {reason}", UserWarning, stacklevel=2)
            return {**dict.fromkeys(PIXEL_KEYS, math.nan), "pixel_undefined": reason}
        out["pixel_AUPRO"] = MF.pro_area(fpr, pro, self.pro_metric.fpr_limit)
        return {k: out[k] for k in PIXEL_KEYS}


def score_dataset(detector, dataset: Dataset, batch_size: int = 256, num_workers: int = 0,
                  pixels: PixelMetrics | None = None):
    """Run ``detector.score`` over ``dataset``; returns (scores, labels, defect types) in dataset order.

    With ``pixels`` the detector's anomaly maps of each batch go to it as well (:func:`scores_and_maps`, one batch
    at a time: the maps of the whole dataset are never held)."""
    labels: list[int] = []
    defects: list[str] = []

    def batches() -> Iterator[dict]:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
            labels.extend(int(v) for v in batch["label"])
            defects.extend(batch["defect_type"])
            yield batch

    if pixels is None:
        scores = detector.score(batches())
    else:
        parts = []
        for batch in batches():
            batch_scores, maps = scores_and_maps(detector, batch)
            pixels.update(maps, batch)
            parts.append(batch_scores.reshape(-1).cpu())
        if not parts:
            raise ValueError("score_dataset: the dataset is empty")
        scores = torch.cat(parts)
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
