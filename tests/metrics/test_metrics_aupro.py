"""AUPRO against pyaupro's copy of the MVTec reference, an MVTec-style sort-based computation written here, and a
brute-force threshold-by-threshold computation; hand-computed curves; edge cases."""

import numpy as np
import pytest
import torch
from pyaupro import auc_compute
from pyaupro._reference import compute_pro
from scipy import ndimage

from anomgen.errors import MetricError
from anomgen.metrics import DEFAULT_NUM_THRESHOLDS, MissingClassError, aupro, pro_curve
from anomgen.metrics._synthetic import smooth_maps_and_blob_masks
from anomgen.metrics.functional import region_sizes


def mvtec_style_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    """Sort all pixels by descending score; each normal pixel adds 1/num_normal to FPR, each region pixel adds
    1/(region size * num_regions) to PRO; keep the last point of each run of equal scores; trapezoid up to
    ``limit`` with linear interpolation at ``limit``; divide by ``limit``."""
    fp_step = np.zeros(maps.shape, dtype=np.float64)
    pro_step = np.zeros(maps.shape, dtype=np.float64)
    num_regions = 0
    for i, mask in enumerate(masks):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        num_regions += n
        fp_step[i][labelled == 0] = 1.0
        for r in range(1, n + 1):
            region = labelled == r
            pro_step[i][region] = 1.0 / region.sum()
    fp_step /= fp_step.sum()
    pro_step /= num_regions
    order = np.argsort(-maps.ravel(), kind="stable")
    scores = maps.ravel()[order]
    fpr = np.cumsum(fp_step.ravel()[order])
    pro = np.cumsum(pro_step.ravel()[order])
    keep = np.append(scores[1:] != scores[:-1], True)
    fpr = np.concatenate([[0.0], fpr[keep]])
    pro = np.concatenate([[0.0], np.minimum(pro[keep], 1.0)])
    inside = fpr <= limit
    x, y = list(fpr[inside]), list(pro[inside])
    first_out = int(inside.sum())
    if first_out < len(fpr):
        x0, x1, y0, y1 = fpr[first_out - 1], fpr[first_out], pro[first_out - 1], pro[first_out]
        x.append(limit)
        y.append(y0 + (y1 - y0) * (limit - x0) / (x1 - x0))
    x, y = np.asarray(x), np.asarray(y)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2.0) / limit)


def brute_force_pro_points(maps: np.ndarray, masks: np.ndarray) -> list[tuple[float, float]]:
    """(FPR, PRO) at every distinct threshold, region by region, without sorting tricks."""
    regions, normal = [], []
    for m, mask in zip(maps, masks):
        labelled, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [m[labelled == r] for r in range(1, n + 1)]
        normal.append(m[labelled == 0])
    normal = np.concatenate(normal)
    points = []
    for t in np.unique(maps)[::-1]:
        points.append((float(np.mean(normal >= t)), float(np.mean([np.mean(r >= t) for r in regions]))))
    return points


def reference_aupro(maps: np.ndarray, masks: np.ndarray, limit: float = 0.3) -> float:
    fpr, pro = compute_pro(list(maps), list(masks.astype(np.int32)))
    return float(auc_compute(torch.from_numpy(fpr).double(), torch.from_numpy(pro).double(), limit=limit))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_mvtec_reference_and_own_mvtec_style(seed):
    maps, masks = smooth_maps_and_blob_masks(20, 64, seed=seed)
    value = aupro(maps, masks)
    m, k = maps.numpy().astype(np.float64), masks.numpy()
    assert value == pytest.approx(mvtec_style_aupro(m, k), abs=1e-9)
    # pyaupro's integration takes the curve up to the last point below the limit (no interpolation) and its FPRs
    # are float32, hence a looser tolerance (one FPR step is ~1e-5 here)
    assert value == pytest.approx(reference_aupro(m, k), abs=1e-4)
    assert 0.0 < value < 1.0


@pytest.mark.parametrize("limit", [0.05, 0.3, 1.0])
def test_other_fpr_limits_and_ties(limit):
    maps, masks = smooth_maps_and_blob_masks(8, 32, seed=7)
    maps = torch.round(maps * 50) / 50  # many ties between normal and region pixels
    m, k = maps.numpy().astype(np.float64), masks.numpy()
    assert aupro(maps, masks, fpr_limit=limit) == pytest.approx(mvtec_style_aupro(m, k, limit), abs=1e-9)


def test_curve_matches_brute_force():
    maps, masks = smooth_maps_and_blob_masks(4, 16, seed=3, normal_every=2)
    maps = torch.round(maps * 200) / 200
    fpr, pro, thresholds = pro_curve(maps, masks)
    expected = brute_force_pro_points(maps.numpy(), masks.numpy())
    assert len(expected) == len(thresholds)
    assert torch.all(thresholds[:-1] > thresholds[1:])
    np.testing.assert_allclose(fpr.numpy(), [p[0] for p in expected], atol=1e-12)
    np.testing.assert_allclose(pro.numpy(), [p[1] for p in expected], atol=1e-12)


def test_hand_computed_single_region_with_tie_and_interpolation():
    # normal pixels 4, 3, 2, 1; one region of two adjacent pixels scored 3 (tied with a normal pixel) and 0.
    # curve: (0,0) -> (0.25, 0) -> (0.5, 0.5) [tie: one point] -> (0.75, 0.5) -> (1, 0.5) -> (1, 1)
    maps = torch.tensor([[[4.0, 3.0, 2.0], [1.0, 3.0, 0.0]]])
    masks = torch.tensor([[[0, 0, 0], [0, 1, 1]]])
    fpr, pro, thresholds = pro_curve(maps, masks)
    assert fpr.tolist() == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert pro.tolist() == [0.0, 0.5, 0.5, 0.5, 1.0]
    assert thresholds.tolist() == [4.0, 3.0, 2.0, 1.0, 0.0]
    # up to 0.3: interpolated PRO at 0.3 is 0.1, area 0.5 * 0.05 * 0.1 = 0.0025
    assert aupro(maps, masks, fpr_limit=0.3) == pytest.approx(0.0025 / 0.3, abs=1e-12)
    # up to 0.5 (a curve point): 0.5 * 0.25 * 0.5 = 0.0625
    assert aupro(maps, masks, fpr_limit=0.5) == pytest.approx(0.0625 / 0.5, abs=1e-12)
    # whole curve: 0.0625 + 0.5 * 0.5 = 0.3125
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.3125, abs=1e-12)


def test_regions_use_8_connectivity_per_image():
    mask = torch.zeros(2, 6, 6, dtype=torch.bool)
    mask[0, 0, 0] = mask[0, 0, 1] = mask[0, 1, 2] = True  # (0,1)-(1,2) touch diagonally: one region of 3
    mask[1, 0, 0] = True  # same position in the next image: a separate region
    sizes, n = region_sizes(mask)
    assert n == 2
    assert sizes[0][mask[0]].tolist() == [3, 3, 3] and sizes[1][mask[1]].tolist() == [1]
    assert int(sizes[~mask].abs().sum()) == 0
    maps = torch.zeros(2, 6, 6)
    maps[0, 1, 2] = 1.0  # only the diagonal pixel is detected: PRO = (1/3 + 0) / 2 regions
    _, pro, _ = pro_curve(maps, mask)
    assert float(pro[0]) == pytest.approx(1 / 6)


def test_normal_images_only_add_normal_pixels():
    maps, masks = smooth_maps_and_blob_masks(6, 32, seed=4, normal_every=0)
    assert bool(masks.flatten(1).any(1).all())
    low = torch.full((3, 32, 32), -1.0)  # normal images scored below everything: they add FPR only at the end
    value = aupro(torch.cat([maps, low]), torch.cat([masks, torch.zeros(3, 32, 32, dtype=torch.bool)]))
    m = np.concatenate([maps.numpy(), low.numpy()]).astype(np.float64)
    k = np.concatenate([masks.numpy(), np.zeros((3, 32, 32), dtype=bool)])
    assert value == pytest.approx(mvtec_style_aupro(m, k), abs=1e-9)
    # rescaling FPR: the curve of the original images with num_normal grown by 3*32*32
    fpr, pro, _ = pro_curve(maps, masks)
    n_normal = int((~masks).sum())
    fpr_all, pro_all, _ = pro_curve(torch.cat([maps, low]),
                                    torch.cat([masks, torch.zeros(3, 32, 32, dtype=torch.bool)]))
    np.testing.assert_allclose(fpr_all[:-1].numpy(), fpr.numpy() * n_normal / (n_normal + 3 * 32 * 32), atol=1e-12)
    np.testing.assert_allclose(pro_all[:-1].numpy(), pro.numpy(), atol=1e-12)


def test_single_region_perfect_detector_is_exactly_one():
    maps = torch.zeros(1, 16, 16)
    masks = torch.zeros(1, 16, 16, dtype=torch.bool)
    masks[0, 4:8, 4:8] = True
    maps[masks] = 5.0
    assert aupro(maps, masks) == 1.0
    assert aupro(maps, masks, num_thresholds=100, score_range=(0, 5)) == 1.0
    assert aupro(-maps, masks) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_never_above_one(seed):
    maps, masks = smooth_maps_and_blob_masks(5, 32, seed=seed)
    good = torch.where(masks, maps + 10.0, maps)  # near-perfect detectors, many regions
    for value in (aupro(good, masks), aupro(good, masks, fpr_limit=0.01),
                  aupro(good, masks, num_thresholds=50, score_range=(0, 11))):
        assert 0.0 <= value <= 1.0


def test_no_region_or_no_normal_pixel_raises():
    maps = torch.rand(2, 8, 8)
    with pytest.raises(MissingClassError, match="no anomalous region"):
        aupro(maps, torch.zeros(2, 8, 8))
    with pytest.raises(MetricError, match="no normal pixel"):
        aupro(maps, torch.ones(2, 8, 8))
    with pytest.raises(MetricError, match="no anomalous region"):
        aupro(maps, torch.zeros(2, 8, 8), num_thresholds=10, score_range=(0, 1))


def test_invalid_inputs_raise():
    maps, masks = torch.rand(2, 8, 8), torch.zeros(2, 8, 8)
    masks[0, 2:4, 2:4] = 1
    with pytest.raises(MetricError, match="fpr_limit"):
        aupro(maps, masks, fpr_limit=0.0)
    with pytest.raises(MetricError, match=r"mask values must be 0 \(normal\) or 1"):
        aupro(maps, masks * 0.5)
    with pytest.raises(MetricError, match="shapes do not match"):
        aupro(maps, masks[:, :4])
    with pytest.raises(MetricError, match="outside score_range"):
        aupro(maps + 1.0, masks, num_thresholds=10, score_range=(0, 1))
    assert aupro(maps.unsqueeze(1), masks) == aupro(maps, masks)  # (N,1,H,W) maps are accepted


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binned_matches_exact(seed):
    maps, masks = smooth_maps_and_blob_masks(20, 64, seed=seed)
    exact = aupro(maps, masks)
    binned = aupro(maps, masks, num_thresholds=DEFAULT_NUM_THRESHOLDS, score_range=(0, 1))
    assert abs(exact - binned) < 1e-3
