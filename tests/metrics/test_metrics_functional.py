"""Functional AUROC / AP / F1Max (image and pixel) against scikit-learn, edge cases, exact vs binned."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    average_precision_score,
    precision_recall_curve,
    roc_auc_score,
)

from anomgen.errors import MetricError
from anomgen.metrics import (
    DEFAULT_NUM_THRESHOLDS,
    MissingClassError,
    aupro,
    auroc,
    average_precision,
    f1_max,
)
from anomgen.metrics._synthetic import smooth_maps_and_blob_masks


def sklearn_f1_max(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    best = int(np.argmax(f1))
    return float(f1[best]), float(thresholds[best])


def image_data(n=300, seed=0, low=0.0, high=1.0, ties=False):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, generator=g) < 0.3).long()
    scores = torch.randn(n, generator=g, dtype=torch.float64) + 1.2 * labels
    scores = (scores - scores.min()) / (scores.max() - scores.min())
    if ties:
        scores = torch.round(scores * 20) / 20  # many tied scores across both classes
    return low + (high - low) * scores, labels


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("ties", [False, True])
def test_image_metrics_match_sklearn(seed, ties):
    scores, labels = image_data(seed=seed, ties=ties)
    s, y = scores.numpy(), labels.numpy()
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    f1, threshold = f1_max(scores, labels)
    ref_f1, ref_threshold = sklearn_f1_max(s, y)
    assert f1 == pytest.approx(ref_f1, abs=1e-12)
    assert threshold == pytest.approx(ref_threshold, abs=0)


def test_f1_threshold_is_a_score_and_reaches_the_f1():
    scores, labels = image_data(n=500, seed=3)
    f1, threshold = f1_max(scores, labels)
    assert threshold in set(scores.tolist())
    pred = scores >= threshold
    tp = int((pred & (labels == 1)).sum())
    fp = int((pred & (labels == 0)).sum())
    fn = int((~pred & (labels == 1)).sum())
    assert f1 == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)
    assert threshold > float(scores.min())


def test_scores_far_outside_unit_interval_are_valid_in_exact_mode():
    """No hidden sigmoid: [-50, 300] scores give sklearn's values, and the metrics are invariant to a monotone map
    (a sigmoid would saturate such scores into ties and change them)."""
    scores, labels = image_data(n=400, seed=5, low=-50.0, high=300.0)
    s, y = scores.numpy(), labels.numpy()
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    f1, threshold = f1_max(scores, labels)
    assert (f1, threshold) == pytest.approx(sklearn_f1_max(s, y), abs=1e-12)
    assert -50.0 <= threshold <= 300.0
    unit = (scores + 50.0) / 350.0
    assert auroc(unit, labels) == pytest.approx(auroc(scores, labels), abs=1e-12)
    maps, masks = smooth_maps_and_blob_masks(6, 32, seed=1)
    assert aupro(maps * 350.0 - 50.0, masks) == pytest.approx(aupro(maps, masks), abs=1e-9)


def test_pixel_metrics_are_the_functions_on_flattened_maps():
    maps, masks = smooth_maps_and_blob_masks(8, 32, seed=2)
    s, y = maps.flatten().numpy(), masks.flatten().numpy()
    assert auroc(maps, masks) == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert auroc(maps.unsqueeze(1), masks) == pytest.approx(roc_auc_score(y, s), abs=1e-9)
    assert average_precision(maps.unsqueeze(1), masks.long()) == pytest.approx(average_precision_score(y, s), abs=1e-9)
    assert f1_max(maps, masks.float()) == pytest.approx(sklearn_f1_max(s, y), abs=1e-9)


@pytest.mark.parametrize("fn", [auroc, average_precision, f1_max])
def test_no_anomalous_or_no_normal_sample_raises(fn):
    scores = torch.linspace(0, 1, 10)
    with pytest.raises(MetricError, match="no anomalous sample"):
        fn(scores, torch.zeros(10))
    with pytest.raises(MetricError, match="no normal sample"):
        fn(scores, torch.ones(10))
    with pytest.raises(MissingClassError, match="no anomalous sample"):
        fn(scores, torch.zeros(10), num_thresholds=100, score_range=(0, 1))
    with pytest.raises(MissingClassError, match="no samples"):
        fn(torch.empty(0), torch.empty(0))


@pytest.mark.parametrize("fn", [auroc, average_precision, f1_max])
def test_invalid_inputs_raise(fn):
    scores = torch.linspace(0, 1, 6)
    with pytest.raises(MetricError, match=r"0 \(normal\) or 1 \(anomalous\).*-1"):
        fn(scores, torch.tensor([0, 1, -1, 0, 1, 0]))
    with pytest.raises(MetricError, match="NaN or inf"):
        fn(torch.tensor([0.1, float("nan"), 0.3]), torch.tensor([0, 1, 0]))
    with pytest.raises(MetricError, match="shapes do not match"):
        fn(scores, torch.tensor([0, 1, 0]))
    with pytest.raises(MetricError, match="outside score_range"):
        fn(scores * 2, torch.tensor([0, 1, 1, 0, 1, 0]), num_thresholds=100, score_range=(0, 1))
    with pytest.raises(MetricError, match="num_thresholds"):
        fn(scores, torch.tensor([0, 1, 1, 0, 1, 0]), num_thresholds=1)


def test_known_values():
    # perfect separation, reversed, and all-tied scores
    labels = torch.tensor([0, 0, 1, 1])
    assert auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert auroc(torch.tensor([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    assert auroc(torch.full((4,), 0.5), labels) == 0.5
    assert average_precision(torch.full((4,), 0.5), labels) == 0.5
    assert f1_max(torch.tensor([0.1, 0.2, 0.8, 0.9]), labels) == (1.0, pytest.approx(0.8))
    # ties between classes count half in AUROC: pairs (0.5,0.5) tie, the rest are ordered correctly
    assert auroc(torch.tensor([0.1, 0.5, 0.5, 0.9]), labels) == pytest.approx(0.875)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binned_matches_exact_on_realistic_maps(seed):
    maps, masks = smooth_maps_and_blob_masks(20, 64, seed=seed)
    binned = dict(num_thresholds=DEFAULT_NUM_THRESHOLDS, score_range=(0.0, 1.0))
    assert abs(auroc(maps, masks) - auroc(maps, masks, **binned)) < 1e-3
    assert abs(average_precision(maps, masks) - average_precision(maps, masks, **binned)) < 1e-3
    f1_exact, _ = f1_max(maps, masks)
    f1_binned, thr_binned = f1_max(maps, masks, **binned)
    assert abs(f1_exact - f1_binned) < 1e-3
    pred = maps >= thr_binned  # the binned threshold achieves the binned F1 exactly
    tp, fp, fn = int((pred & masks).sum()), int((pred & ~masks).sum()), int((~pred & masks).sum())
    assert f1_binned == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-12)
    assert abs(aupro(maps, masks) - aupro(maps, masks, **binned)) < 1e-3
    # image level: max of each map as the image score
    scores, labels = maps.flatten(1).amax(1), masks.flatten(1).any(1)
    for fn in (auroc, average_precision):
        assert abs(fn(scores, labels) - fn(scores, labels, **binned)) < 1e-3


def test_binned_default_range_is_the_scores_own_range():
    scores, labels = image_data(n=300, seed=4, low=-50.0, high=300.0)
    exact = auroc(scores, labels)
    assert abs(auroc(scores, labels, num_thresholds=DEFAULT_NUM_THRESHOLDS) - exact) < 1e-3
    # a coarse binning over the right range is still a valid (approximate) value, never NaN
    coarse = auroc(scores, labels, num_thresholds=5)
    assert 0.0 <= coarse <= 1.0 and not math.isnan(coarse)


@pytest.mark.parametrize(("score_range", "k"), [((0.0, 1.0), 10_000), ((-50.0, 300.0), 7), ((0.1, 0.3), 1000)])
def test_bin_index_is_exactly_score_at_least_threshold(score_range, k):
    from anomgen.metrics.functional import bin_index, linear_thresholds

    th = linear_thresholds(k, score_range)
    lo, hi = score_range
    just_below = torch.nextafter(th, torch.full_like(th, -math.inf)).clamp(min=lo)
    just_above = torch.nextafter(th, torch.full_like(th, math.inf)).clamp(max=hi)
    uniform = torch.rand(20_000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * (hi - lo) + lo
    scores = torch.cat([th, just_below, just_above, uniform])
    idx = bin_index(scores, th)
    assert torch.equal(idx, torch.bucketize(scores, th, right=True) - 1)
    assert bool((th[idx] <= scores).all())
    assert bool((scores[idx < k - 1] < th[idx[idx < k - 1] + 1]).all())
    scores32 = scores.float().clamp(lo, hi)
    scores32 = scores32[(scores32.double() >= lo) & (scores32.double() <= hi)]
    assert torch.equal(bin_index(scores32, th), torch.bucketize(scores32.double(), th, right=True) - 1)
