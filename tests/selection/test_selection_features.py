"""The feature cache (anomgen.selection.features): each (image, extractor) pair computed once, in memory and on
disk, features equal to the extractor's own output in dataset order."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from anomgen.data.base import ArrayRecordDataset
from anomgen.data.synthetic import SyntheticSet, write_set
from anomgen.data.tasks import TaskView
from anomgen.encoders.raw import DownsampledPixels
from anomgen.errors import DatasetError
from anomgen.selection.features import FeatureCache, dataset_entries


def _base(n: int = 20, seed: int = 0) -> ArrayRecordDataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 8, 8, 3), dtype=np.uint8)
    classes = np.arange(n) % 2
    return ArrayRecordDataset(images, classes, ["a", "b"], "blob", range(n))


class Counting(nn.Module):
    """An extractor that records how many images it was given per call."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[int] = []

    @property
    def seen(self) -> int:
        return sum(self.calls)

    def forward(self, images):
        self.calls.append(len(images))
        return self.inner(images)


class Records(Dataset):
    """Records only: no ``entries``, so the cache learns the paths by loading them."""

    def __init__(self, base, indices) -> None:
        self.base, self.indices = base, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        return self.base[self.indices[i]]


def _direct(extractor: nn.Module, dataset) -> torch.Tensor:
    with torch.no_grad():
        return extractor(torch.stack([dataset[i]["image"] for i in range(len(dataset))]))


def test_each_image_is_computed_once_across_datasets_and_candidates():
    base = _base()
    first, second = TaskView(base, range(12)), TaskView(base, range(6, 20))
    extractor = Counting(DownsampledPixels(4))
    cache = FeatureCache()
    feats = cache.features("px4", extractor, first, batch_size=5)
    torch.testing.assert_close(feats, _direct(DownsampledPixels(4), first))
    assert (cache.num_computed["px4"], cache.num_hits["px4"], extractor.seen) == (12, 0, 12)
    assert extractor.calls == [5, 5, 2]  # batches of batch_size

    feats = cache.features("px4", extractor, second, batch_size=5)  # shares images 6..11 with the first
    torch.testing.assert_close(feats, _direct(DownsampledPixels(4), second))
    assert (cache.num_computed["px4"], cache.num_hits["px4"], extractor.seen) == (20, 6, 20)

    cache.features("px4", extractor, first)  # a second candidate on the same extractor
    assert (cache.num_computed["px4"], cache.num_hits["px4"], extractor.seen) == (20, 18, 20)

    other = Counting(DownsampledPixels(2))
    torch.testing.assert_close(cache.features("px2", other, second), _direct(DownsampledPixels(2), second))
    assert (cache.num_computed["px2"], cache.num_hits["px2"], other.seen) == (14, 0, 14)
    assert cache.stats() == {"px4": {"computed": 20, "hits": 18, "stored": 20},
                             "px2": {"computed": 14, "hits": 0, "stored": 14}}


def test_features_reload_from_disk_in_a_new_cache(tmp_path):
    base = _base()
    part, whole = TaskView(base, range(10)), TaskView(base, range(20))
    extractor = Counting(DownsampledPixels(4))
    cache = FeatureCache(tmp_path / "cache")
    expected = cache.features("px4", extractor, part)
    assert not (tmp_path / "cache").exists()  # fewer new rows than save_every: nothing written yet
    assert cache.save() == [cache.file("px4")]
    assert cache.save() == []  # nothing new since

    again = FeatureCache(tmp_path / "cache", save_every=1)
    torch.testing.assert_close(again.features("px4", extractor, part), expected)
    assert (again.num_computed["px4"], again.num_hits["px4"], extractor.seen) == (0, 10, 10)
    torch.testing.assert_close(again.features("px4", extractor, whole), _direct(DownsampledPixels(4), whole))
    assert (again.num_computed["px4"], extractor.seen) == (10, 20)  # only the new images; saved at once

    third = FeatureCache(tmp_path / "cache")
    third.features("px4", extractor, whole)
    assert (third.num_computed["px4"], third.num_hits["px4"]) == (0, 20)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [cache.file("px4").name]  # no temporary file left


def test_a_file_made_by_another_extractor_is_not_reused(tmp_path):
    base = _base()
    data = TaskView(base, range(8))
    cache = FeatureCache(tmp_path)
    cache.features("px", DownsampledPixels(4), data)
    cache.save()
    other = FeatureCache(tmp_path)
    with pytest.warns(UserWarning, match="another extractor named 'px'"):
        feats = other.features("px", DownsampledPixels(2), data)  # same name, other settings
    torch.testing.assert_close(feats, _direct(DownsampledPixels(2), data))
    assert other.num_computed["px"] == 8
    other.save()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert FeatureCache(tmp_path).features("px", DownsampledPixels(2), data).shape == (8, 12)


def test_datasets_without_entries_and_concatenations():
    base = _base()
    extractor = Counting(DownsampledPixels(4))
    cache = FeatureCache()
    records = Records(base, [3, 1, 2])
    assert dataset_entries(records) is None
    torch.testing.assert_close(cache.features("px", extractor, records, batch_size=2),
                               _direct(DownsampledPixels(4), records))
    assert (cache.num_computed["px"], extractor.seen) == (3, 3)
    mixed = Records(base, [1, 9, 2])  # two seen, one new: only the new one goes through the extractor
    torch.testing.assert_close(cache.features("px", extractor, mixed), _direct(DownsampledPixels(4), mixed))
    assert (cache.num_computed["px"], cache.num_hits["px"], extractor.seen) == (4, 2, 4)

    concat = ConcatDataset([TaskView(base, [1, 2]), TaskView(base, [7, 8])])
    assert [e.image_path for e in dataset_entries(concat)] == [base.entries[i].image_path for i in (1, 2, 7, 8)]
    torch.testing.assert_close(cache.features("px", extractor, concat), _direct(DownsampledPixels(4), concat))
    assert (cache.num_computed["px"], cache.num_hits["px"], extractor.seen) == (6, 4, 6)

    with pytest.raises(DatasetError, match="occurs more than once"):
        cache.features("px", extractor, Records(base, [4, 5, 4]))


def test_image_paths_must_be_unique_and_non_empty():
    base = _base()
    cache = FeatureCache()
    with pytest.raises(DatasetError, match="blob:00002.*more than once"):
        cache.features("px", DownsampledPixels(2), TaskView(base, [1, 2, 2]))
    nameless = ArrayRecordDataset(np.zeros((2, 8, 8), np.uint8), np.zeros(2, int), ["a"], "x", range(2))
    nameless.entries = [e.__class__("", e.label, e.category, e.defect_type) for e in nameless.entries]
    with pytest.raises(DatasetError, match="no image_path"):
        cache.features("px", DownsampledPixels(2), nameless)


def test_extractor_output_is_checked():
    data = TaskView(_base(), range(4))
    with pytest.raises(ValueError, match="must return 4 × D features"):
        FeatureCache().features("bad", nn.Flatten(0), data)
    with pytest.raises(ValueError, match="NaN or infinite"):
        FeatureCache().features("nan", nn.Sequential(DownsampledPixels(2), nn.Threshold(2.0, float("nan"))), data)


def test_synthetic_set_images_are_keyed_by_their_png_path(tmp_path):
    rng = np.random.default_rng(1)
    samples = [{"image": torch.from_numpy(rng.random((3, 8, 8))).float(), "label": 1, "generator": "noise_patch",
                "category": "a", "defect_type": "noise_patch"} for _ in range(3)]
    root = write_set(tmp_path / "set", samples, {"generator": "noise_patch"})
    synthetic = SyntheticSet(root)
    cache = FeatureCache()
    feats = cache.features("px", DownsampledPixels(4), synthetic)
    torch.testing.assert_close(feats, _direct(DownsampledPixels(4), synthetic))
    stored = cache.stored_paths("px")
    assert stored == [str(root / "images" / f"{i:06d}.png") for i in range(3)]
    assert all(p.endswith(".png") for p in stored)
