"""Pixel metrics of detectors with anomaly maps (anomgen.selection.evaluation): one pass per batch, the values of
sklearn / the MVTec reference, resizing, and the cases where they are absent or undefined."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pyaupro import auc_compute
from pyaupro._reference import compute_pro
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from anomgen.metrics._synthetic import smooth_maps_and_blob_masks
from anomgen.selection import PIXEL_KEYS, PixelMetrics, dataset_has_masks, has_anomaly_maps, score_dataset


def records(maps: torch.Tensor, masks: torch.Tensor, with_mask_files: bool = True) -> list[dict]:
    """Records whose image holds the map (so that a fake detector can give it back), with their masks."""
    out = []
    for i, (m, k) in enumerate(zip(maps, masks)):
        anomalous = bool(k.any())
        out.append({"image": m[None].expand(3, -1, -1).clone(), "label": int(anomalous), "mask": k.float(),
                    "image_path": f"img{i}.png", "mask_path": f"mask{i}.png" if with_mask_files and anomalous else "",
                    "category": "blob", "source": "real", "defect_type": "blob" if anomalous else "good"})
    return out


class MapDetector:
    """Gives back each record's map (its image's first channel) and the map's max as the image score; ``predict``
    gives both (and counts its calls), ``score`` / ``score_maps`` fail if called."""

    def __init__(self, size: tuple[int, int] | None = None) -> None:
        self.size = size
        self.predict_calls = 0

    def predict(self, batches):
        self.predict_calls += 1
        maps = torch.cat([b["image"][:, 0] for b in batches])
        if self.size is not None:
            maps = torch.nn.functional.interpolate(maps[:, None], size=self.size, mode="bilinear",
                                                   align_corners=False, antialias=True)[:, 0]
        return maps.amax(dim=(-2, -1)).double(), maps

    def score(self, batches):
        raise AssertionError("score: predict gives the scores with the maps")

    def score_maps(self, batches):
        raise AssertionError("score_maps: predict gives the maps with the scores")


class ScoreAndMapsDetector:
    """Maps without ``predict``: ``score`` and ``score_maps`` per batch."""

    def score(self, batches):
        return torch.cat([b["image"][:, 0].amax(dim=(-2, -1)).double() for b in batches])

    def score_maps(self, batches):
        return torch.cat([b["image"][:, :1] for b in batches])  # B × 1 × H × W is accepted too


class ScoreOnlyDetector:
    def score(self, batches):
        return torch.cat([b["image"].mean(dim=(1, 2, 3)) for b in batches])


def reference(maps: torch.Tensor, masks: torch.Tensor) -> dict:
    """sklearn's AUROC, AP and F1-max on the flattened pixels; AUPRO from the MVTec reference (pyaupro)."""
    y, s = masks.flatten().numpy().astype(int), maps.flatten().double().numpy()
    precision, recall, _ = precision_recall_curve(y, s)
    f1 = np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12))
    fpr, pro = compute_pro(list(maps.double().numpy()), list(masks.numpy().astype(np.int32)))
    return {"pixel_AUROC": roc_auc_score(y, s), "pixel_AP": average_precision_score(y, s), "pixel_F1Max": f1,
            "pixel_AUPRO": float(auc_compute(torch.from_numpy(fpr).double(), torch.from_numpy(pro).double(),
                                             limit=0.3))}


@pytest.mark.parametrize("num_thresholds", [None, 10_000])
def test_pixel_metrics_of_one_pass_equal_sklearn_and_the_mvtec_reference(one_thread, num_thresholds):
    maps, masks = smooth_maps_and_blob_masks(12, 32, seed=3)
    detector = MapDetector()
    pixels = PixelMetrics(num_thresholds, None if num_thresholds is None else (0.0, 1.0))
    scores, labels, defects = score_dataset(detector, records(maps, masks), batch_size=5, pixels=pixels)
    assert detector.predict_calls == 3  # one call per batch: scores and maps from one pass
    assert torch.equal(scores, maps.amax(dim=(-2, -1)).double()) and labels.tolist() == [int(k.any()) for k in masks]
    out = pixels.compute()
    assert list(out) == list(PIXEL_KEYS)
    ref = reference(maps, masks)
    # exact: the same numbers; binned: within the documented 1e-3 (the AUPRO reference has float32 FPRs: 1e-4)
    tol = {"pixel_AUPRO": 1e-4} if num_thresholds is None else {}
    for key, value in ref.items():
        assert out[key] == pytest.approx(value, abs=tol.get(key, 1e-9 if num_thresholds is None else 1e-3)), key
    assert ((maps >= out["pixel_F1Max_threshold"]) & (masks > 0)).any()
    described = pixels.describe()
    assert described["mode"] == ("exact" if num_thresholds is None else "binned")
    assert described["num_images"] == 12 and described["num_masks"] == int(masks.flatten(1).any(1).sum())


def test_a_detector_without_predict_gives_scores_and_maps_by_score_and_score_maps(one_thread):
    maps, masks = smooth_maps_and_blob_masks(6, 16, seed=2)
    pixels, exact = PixelMetrics(), PixelMetrics()
    scores, _, _ = score_dataset(ScoreAndMapsDetector(), records(maps, masks), batch_size=4, pixels=pixels)
    score_dataset(MapDetector(), records(maps, masks), batch_size=4, pixels=exact)
    assert torch.equal(scores, maps.amax(dim=(-2, -1)).double())
    assert pixels.compute() == exact.compute()


def test_maps_of_another_size_are_resized_to_the_masks_with_a_warning(one_thread):
    maps, masks = smooth_maps_and_blob_masks(6, 32, seed=1)
    pixels = PixelMetrics()
    with pytest.warns(UserWarning, match=r"anomaly maps of \(16, 16\) resized bilinearly to the masks' \(32, 32\)"):
        score_dataset(MapDetector(size=(16, 16)), records(maps, masks), batch_size=4, pixels=pixels)
    assert pixels.describe()["maps_resized_from"] == [16, 16]
    small = torch.nn.functional.interpolate(maps[:, None], size=(16, 16), mode="bilinear", align_corners=False,
                                            antialias=True)
    back = torch.nn.functional.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False,
                                           antialias=True)[:, 0]
    assert pixels.compute()["pixel_AUROC"] == pytest.approx(reference(back, masks)["pixel_AUROC"], abs=1e-9)


def test_no_anomalous_pixel_makes_the_pixel_metrics_undefined_not_a_number(one_thread):
    maps, masks = smooth_maps_and_blob_masks(4, 16, seed=0)
    data = records(maps, masks)
    for r in data:  # mask files that hold no anomalous pixel
        r["mask"] = torch.zeros_like(r["mask"])
        r["mask_path"] = "empty_mask.png"
    pixels = PixelMetrics(10_000, (0.0, 1.0))
    score_dataset(MapDetector(), data, batch_size=4, pixels=pixels)
    with pytest.warns(UserWarning, match="no anomalous pixel"):
        out = pixels.compute()
    assert all(math.isnan(out[k]) for k in PIXEL_KEYS)
    assert "no anomalous pixel (mask 1)" in out["pixel_undefined"] and "pixel_AUPRO" in out["pixel_undefined"]


def test_no_mask_file_gives_no_pixel_metrics(one_thread):
    maps, masks = smooth_maps_and_blob_masks(4, 16, seed=0)
    pixels = PixelMetrics()
    score_dataset(MapDetector(), records(maps, masks, with_mask_files=False), batch_size=4, pixels=pixels)
    assert pixels.compute() == {}


def test_binned_maps_outside_the_range_are_an_error(one_thread):
    from anomgen.errors import MetricError

    maps, masks = smooth_maps_and_blob_masks(4, 16, seed=0)
    with pytest.raises(MetricError, match="winclip's anomaly maps: .*outside score_range"):
        score_dataset(MapDetector(), records(maps * 3.0, masks), batch_size=4,
                      pixels=PixelMetrics(100, (0.0, 1.0), name="winclip"))


def test_which_detectors_and_datasets_have_maps_and_masks():
    from anomgen.data.record import Entry
    from anomgen.detectors.winclip import WinCLIP

    assert has_anomaly_maps(MapDetector()) and has_anomaly_maps(WinCLIP.__new__(WinCLIP))
    assert not has_anomaly_maps(ScoreOnlyDetector())
    assert WinCLIP.map_range == (0.0, 1.0)

    class WithEntries(list):
        entries = [Entry("a.png", 0, "c", "good"), Entry("b.png", 1, "c", "crack", "b_mask.png")]

    assert dataset_has_masks(WithEntries()) is True
    WithEntries.entries = WithEntries.entries[:1]
    assert dataset_has_masks(WithEntries()) is False
    assert dataset_has_masks([]) is None  # no entries: the records' mask_path tell
