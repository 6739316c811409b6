"""Two gloo processes each update part of the data; compute() on every rank equals one process on all data."""

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from anomgen.metrics import (
    AUPRO,
    AUROC,
    DEFAULT_NUM_THRESHOLDS,
    AveragePrecision,
    F1Max,
)
from anomgen.metrics._synthetic import smooth_maps_and_blob_masks

WORLD = 2
BINNED = dict(num_thresholds=DEFAULT_NUM_THRESHOLDS, score_range=(0.0, 1.0))


def _data():
    maps, masks = smooth_maps_and_blob_masks(14, 32, seed=21)
    scores, labels = maps.flatten(1).amax(1), masks.flatten(1).any(1).long()
    return maps, masks, scores, labels


def _metrics():
    out = {}
    for mode, kw in (("exact", {}), ("binned", BINNED)):
        out[f"image_AUROC_{mode}"] = AUROC(**kw)
        out[f"image_AP_{mode}"] = AveragePrecision(**kw)
        out[f"image_F1Max_{mode}"] = F1Max(**kw)
        out[f"pixel_AUROC_{mode}"] = AUROC(**kw)
        out[f"pixel_AUPRO_{mode}"] = AUPRO(**kw)
    return out


def _run(metrics, maps, masks, scores, labels, index_batches):
    for idx in index_batches:
        for name, metric in metrics.items():
            if name.startswith("image_"):
                metric.update(scores[idx], labels[idx])
            else:
                metric.update(maps[idx], masks[idx])
    values = {name: float(metric.compute()) for name, metric in metrics.items()}
    for name, metric in metrics.items():
        if isinstance(metric, F1Max):
            values[name + "_threshold"] = float(metric.threshold)
    return values


def _worker(rank, port, out_path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        maps, masks, scores, labels = _data()
        # uneven split: rank 0 gets 8 images in batches of 3, rank 1 gets 6 in batches of 4
        own = list(range(8)) if rank == 0 else list(range(8, 14))
        size = 3 if rank == 0 else 4
        index_batches = [torch.tensor(own[i : i + size]) for i in range(0, len(own), size)]
        values = _run(_metrics(), maps, masks, scores, labels, index_batches)
        torch.save(values, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_two_process_compute_equals_single_process(tmp_path, free_port):
    out_path = str(tmp_path / "values")
    mp.spawn(_worker, args=(free_port, out_path), nprocs=WORLD, join=True)
    maps, masks, scores, labels = _data()
    single = _run(_metrics(), maps, masks, scores, labels, [torch.arange(14)])
    assert all(not math.isnan(v) for v in single.values())
    # without the sync, rank 0 would report the values of its own 8 images, which differ
    local = _run(_metrics(), maps, masks, scores, labels, [torch.arange(8)])
    assert sum(abs(local[k] - single[k]) > 1e-3 for k in single) >= len(single) // 2
    for rank in range(WORLD):
        values = torch.load(f"{out_path}.{rank}")
        assert values.keys() == single.keys()
        for name, expected in single.items():
            assert values[name] == pytest.approx(expected, abs=1e-6), (rank, name)
