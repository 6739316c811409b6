"""torchmetrics classes: batched updates equal the functional forms, binned states are bounded, NaN + warning on
degenerate data, errors on invalid input, F1Max threshold, anomaly_metrics keys."""

import math
import warnings

import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from torchmetrics import MetricCollection

from anomgen.errors import MetricError
from anomgen.metrics import (
    AUPRO,
    AUROC,
    DEFAULT_NUM_THRESHOLDS,
    AveragePrecision,
    F1Max,
    F1MaxThreshold,
    anomaly_metrics,
    aupro,
    auroc,
    average_precision,
    f1_max,
    pro_curve,
)
from anomgen.metrics._synthetic import smooth_maps_and_blob_masks

BINNED = dict(num_thresholds=DEFAULT_NUM_THRESHOLDS, score_range=(0.0, 1.0))


def batches(maps, masks, size):
    for i in range(0, len(maps), size):
        yield maps[i : i + size], masks[i : i + size]


@pytest.fixture(scope="module")
def data():
    return smooth_maps_and_blob_masks(20, 64, seed=11)


@pytest.mark.parametrize("binned", [False, True])
def test_pixel_classes_equal_functional(data, binned):
    maps, masks = data
    kw = BINNED if binned else {}
    metrics = {"AUROC": AUROC(**kw), "AP": AveragePrecision(**kw), "F1Max": F1Max(**kw), "AUPRO": AUPRO(**kw)}
    for m, k in batches(maps, masks, 3):  # (B,1,H,W) maps with (B,H,W) masks, as a model gives them
        for metric in metrics.values():
            metric.update(m.unsqueeze(1), k)
    values = {name: float(metric.compute()) for name, metric in metrics.items()}
    assert values["AUROC"] == pytest.approx(auroc(maps, masks, **kw), abs=1e-6)
    assert values["AP"] == pytest.approx(average_precision(maps, masks, **kw), abs=1e-6)
    f1, threshold = f1_max(maps, masks, **kw)
    assert values["F1Max"] == pytest.approx(f1, abs=1e-6)
    assert float(metrics["F1Max"].threshold) == threshold
    assert values["AUPRO"] == pytest.approx(aupro(maps, masks, **kw), abs=1e-6)
    if not binned:
        s, y = maps.flatten().numpy(), masks.flatten().numpy()
        assert values["AUROC"] == pytest.approx(roc_auc_score(y, s), abs=1e-6)
        assert values["AP"] == pytest.approx(average_precision_score(y, s), abs=1e-6)


def test_binned_classes_agree_with_exact_and_keep_small_states(data):
    maps, masks = data
    for cls in (AUROC, AveragePrecision, F1Max, AUPRO):
        exact, binned = cls(), cls(**BINNED)
        for m, k in batches(maps, masks, 5):
            exact.update(m, k)
            binned.update(m, k)
        assert abs(float(exact.compute()) - float(binned.compute())) < 1e-3, cls.__name__
        state_bytes = sum(
            t.numel() * t.element_size()
            for name in binned._defaults
            for t in ([getattr(binned, name)] if torch.is_tensor(getattr(binned, name)) else getattr(binned, name))
        )
        assert state_bytes <= 2 * DEFAULT_NUM_THRESHOLDS * 8 + 8  # O(K), independent of the number of pixels


def test_image_level_with_large_scores():
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(200, generator=g) < 0.4).long()
    scores = torch.randn(200, generator=g) * 60 + 100 + 50 * labels  # roughly [-50, 350]
    metric = AUROC()
    for i in range(0, 200, 32):
        metric.update(scores[i : i + 32], labels[i : i + 32])
    assert float(metric.compute()) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-6)


@pytest.mark.parametrize("cls", [AUROC, AveragePrecision, F1Max, F1MaxThreshold])
@pytest.mark.parametrize("binned", [False, True])
def test_normal_only_data_gives_nan_and_a_warning(cls, binned):
    metric = cls(**(BINNED if binned else {}))
    metric.update(torch.rand(8), torch.zeros(8, dtype=torch.long))
    metric.update(torch.rand(8), torch.zeros(8, dtype=torch.long))
    with pytest.warns(UserWarning, match=rf"{metric.metric_name}: .*no anomalous sample"):
        value = metric.compute()
    assert math.isnan(float(value))
    if isinstance(metric, F1Max):
        assert math.isnan(float(metric.threshold))


@pytest.mark.parametrize("binned", [False, True])
def test_aupro_without_regions_gives_nan_and_a_warning(binned):
    metric = AUPRO(**(BINNED if binned else {}))
    metric.update(torch.rand(2, 16, 16), torch.zeros(2, 16, 16))
    with pytest.warns(UserWarning, match="AUPRO: .*no anomalous region"):
        assert math.isnan(float(metric.compute()))


def test_compute_before_update_is_nan_with_warning():
    with pytest.warns(UserWarning, match="AUROC"):
        assert math.isnan(float(AUROC().compute()))
    with pytest.warns(UserWarning, match="AUPRO"):
        assert math.isnan(float(AUPRO().compute()))


@pytest.mark.parametrize("cls", [AUROC, AveragePrecision, F1Max])
def test_invalid_updates_raise(cls):
    with pytest.raises(MetricError, match=r"-1"):
        cls().update(torch.rand(4), torch.tensor([0, 1, -1, 1]))
    with pytest.raises(MetricError, match="score_range"):
        cls(num_thresholds=100)  # binned mode cannot guess the range of a stream
    metric = cls(num_thresholds=100, score_range=(0, 1))
    metric.update(torch.tensor([0.0, 0.5, 1.0]), torch.tensor([0, 1, 1]))  # the ends of the range are inside
    with pytest.raises(MetricError, match=r"\[-0.5, 2\] outside score_range"):
        metric.update(torch.tensor([-0.5, 0.5, 2.0]), torch.tensor([0, 1, 1]))
    with pytest.raises(MetricError, match="NaN"):
        metric.update(torch.tensor([float("nan")]), torch.tensor([1]))


def test_aupro_invalid_updates_raise():
    with pytest.raises(MetricError, match="score_range"):
        AUPRO(num_thresholds=100)
    with pytest.raises(MetricError, match="fpr_limit"):
        AUPRO(fpr_limit=1.5)
    metric = AUPRO(num_thresholds=100, score_range=(0, 1))
    with pytest.raises(MetricError, match="outside score_range"):
        metric.update(torch.rand(1, 8, 8) + 1.5, torch.zeros(1, 8, 8))
    with pytest.raises(MetricError, match="mask values"):
        AUPRO().update(torch.rand(1, 8, 8), torch.full((1, 8, 8), 2))


def test_aupro_accepts_changing_image_sizes():
    a_maps, a_masks = smooth_maps_and_blob_masks(3, 32, seed=1)
    b_maps, b_masks = smooth_maps_and_blob_masks(3, 48, 40, seed=2)
    metric = AUPRO()
    metric.update(a_maps, a_masks)
    metric.update(b_maps, b_masks)
    fpr, pro, thresholds = metric.curve()
    # reference: pad every image to 48x48 with normal pixels scored below everything; before the padding's own
    # (last) threshold the curve is the same, with FPR rescaled by the number of normal pixels
    padded_maps = torch.full((6, 48, 48), -1.0)
    padded_masks = torch.zeros(6, 48, 48, dtype=torch.bool)
    padded_maps[:3, :32, :32], padded_masks[:3, :32, :32] = a_maps, a_masks
    padded_maps[3:, :, :40], padded_masks[3:, :, :40] = b_maps, b_masks
    ref_fpr, ref_pro, ref_thresholds = pro_curve(padded_maps, padded_masks)
    n_normal = int((~a_masks).sum() + (~b_masks).sum())
    n_pad = 6 * 48 * 48 - 3 * 32 * 32 - 3 * 48 * 40
    torch.testing.assert_close(thresholds, ref_thresholds[:-1].to(thresholds.dtype))
    torch.testing.assert_close(fpr, ref_fpr[:-1] * (n_normal + n_pad) / n_normal)
    torch.testing.assert_close(pro, ref_pro[:-1])
    value = float(metric.compute())
    binned = AUPRO(**BINNED)
    binned.update(a_maps, a_masks)
    binned.update(b_maps, b_masks)
    assert abs(value - float(binned.compute())) < 1e-3


def test_f1max_threshold_lifecycle():
    g = torch.Generator().manual_seed(1)
    labels = (torch.rand(100, generator=g) < 0.5).long()
    scores = torch.rand(100, generator=g) + 0.3 * labels
    metric = F1Max()
    assert math.isnan(float(metric.threshold))
    metric.update(scores[:50], labels[:50])
    metric.update(scores[50:], labels[50:])
    f1 = float(metric.compute())
    expected_f1, expected_threshold = f1_max(scores, labels)
    assert f1 == pytest.approx(expected_f1, abs=1e-6)
    assert float(metric.threshold) == expected_threshold
    # forward returns the batch value but keeps the threshold of the accumulated data
    batch_value = metric(scores[:20], labels[:20])
    assert float(batch_value) == pytest.approx(f1_max(scores[:20], labels[:20])[0], abs=1e-6)
    assert float(metric.threshold) == expected_threshold
    assert float(F1MaxThreshold()(scores, labels)) == pytest.approx(expected_threshold, rel=1e-6)
    metric.reset()
    assert math.isnan(float(metric.threshold))


def test_anomaly_metrics_keys_and_values(data):
    maps, masks = data
    image = anomaly_metrics()
    assert isinstance(image, MetricCollection)
    pixel = anomaly_metrics(("AUROC", "AUPRO"), prefix="pixel_")
    both = anomaly_metrics(("AUROC", "AP", "F1Max", "F1Threshold"), prefix="image_", **BINNED)
    scores, labels = maps.flatten(1).amax(1), masks.flatten(1).any(1).long()
    for m, k in batches(maps, masks, 4):
        image.update(m.flatten(1).amax(1), k.flatten(1).any(1).long())
        both.update(m.flatten(1).amax(1), k.flatten(1).any(1).long())
        pixel.update(m, k)
    image_values, pixel_values, binned_values = image.compute(), pixel.compute(), both.compute()
    assert sorted(image_values) == ["image_AP", "image_AUROC", "image_F1Max"]
    assert sorted(pixel_values) == ["pixel_AUPRO", "pixel_AUROC"]
    assert sorted(binned_values) == ["image_AP", "image_AUROC", "image_F1Max", "image_F1Threshold"]
    assert float(image_values["image_AUROC"]) == pytest.approx(auroc(scores, labels), abs=1e-6)
    assert float(image_values["image_AP"]) == pytest.approx(average_precision(scores, labels), abs=1e-6)
    assert float(image_values["image_F1Max"]) == pytest.approx(f1_max(scores, labels)[0], abs=1e-6)
    assert float(pixel_values["pixel_AUROC"]) == pytest.approx(auroc(maps, masks), abs=1e-6)
    assert float(pixel_values["pixel_AUPRO"]) == pytest.approx(aupro(maps, masks), abs=1e-6)
    assert float(binned_values["image_F1Threshold"]) == pytest.approx(f1_max(scores, labels, **BINNED)[1], rel=1e-6)
    with pytest.raises(MetricError, match="unknown metric"):
        anomaly_metrics(("AUROC", "IoU"))


def test_collection_on_normal_only_validation_does_not_crash():
    metrics = anomaly_metrics()
    metrics.update(torch.rand(6), torch.zeros(6, dtype=torch.long))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        values = metrics.compute()
    assert all(math.isnan(float(v)) for v in values.values())
    messages = " ".join(str(w.message) for w in caught if issubclass(w.category, UserWarning))
    for name in ("AUROC", "AP", "F1Max"):
        assert f"{name}: " in messages


def test_exact_states_do_not_alias_the_callers_buffers():
    scores, labels = torch.tensor([0.1, 0.9, 0.4, 0.6]), torch.tensor([False, True, False, True])
    metric = AUROC()
    metric.update(scores, labels)
    scores.fill_(0.5)  # a loop reusing its buffer must not change what was recorded
    labels.fill_(False)
    assert float(metric.compute()) == 1.0
    maps, masks = torch.rand(1, 8, 8), torch.zeros(1, 8, 8, dtype=torch.bool)
    masks[0, 2:4, 2:4] = True
    maps[masks] += 1.0
    pro = AUPRO()
    pro.update(maps, masks)
    maps.zero_()
    assert float(pro.compute()) == 1.0
