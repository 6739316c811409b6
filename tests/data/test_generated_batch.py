"""GeneratedBatch: the typed batch a generator hands to the export; it checks itself and names the wrong field."""

from __future__ import annotations

import pytest
import torch

from anomgen.data.generation import GeneratedBatch
from anomgen.data.synthetic import SetWriter, SyntheticSet, merge_shards

B, H, W = 3, 8, 10


def _fields(**changes) -> dict:
    fields = {
        "index": torch.tensor([4, 5, 6]),
        "image": torch.rand(B, 3, H, W, generator=torch.Generator().manual_seed(0)),
        "mask": (torch.rand(B, H, W, generator=torch.Generator().manual_seed(1)) > 0.5).float(),
        "label": torch.ones(B, dtype=torch.long),
        "generator": "noise_patch",
        "category": ["3"] * B,
        "defect_type": ["noise_patch"] * B,
        "sources": [[f"src{i}"] for i in range(B)],
        "params": [{"seed": i} for i in range(B)],
    }
    fields.update(changes)
    return fields


def test_a_valid_batch_coerces_lists_and_iterates_rows():
    batch = GeneratedBatch(**_fields(index=[4, 5, 6], label=(1, 1, 1), category=("3", "3", "3")))
    assert len(batch) == B and batch.index.dtype == torch.long and batch.label.dtype == torch.long
    assert isinstance(batch.category, list)
    rows = list(batch.rows())
    assert [r["id"] for r in rows] == ["000004", "000005", "000006"]
    assert rows[1]["image"].shape == (3, H, W) and rows[1]["mask"].shape == (H, W)
    assert rows[2]["sources"] == ["src2"] and rows[0]["params"] == {"seed": 0} and rows[0]["label"] == 1
    assert GeneratedBatch(**_fields(mask=None)).mask is None
    assert GeneratedBatch(**_fields(mask=torch.zeros(B, 1, H, W))).mask.shape == (B, H, W)


@pytest.mark.parametrize("field, value, pattern", [
    ("category", ["3"] * 2, r"category has 2"),
    ("params", [{}] * 4, r"params has 4"),
    ("label", torch.ones(2, dtype=torch.long), r"label has 2"),
    ("sources", [["a"]] * 2, r"sources has 2"),
    ("image", torch.rand(2, 3, H, W), r"image has 2"),
    ("mask", torch.zeros(B, H, W + 1), r"GeneratedBatch\.mask must be B × H × W"),
    ("mask", torch.zeros(B, H, W) + 0.5, r"GeneratedBatch\.mask must hold only 0 and 1"),
    ("image", torch.rand(B, 1, H, W), r"GeneratedBatch\.image must be B × 3 × H × W"),
    ("image", torch.rand(B, 3, H, W) * 2 - 1, r"GeneratedBatch\.image values must lie in \[0, 1\]"),
    ("image", torch.full((B, 3, H, W), float("nan")), r"GeneratedBatch\.image values"),
    ("label", torch.tensor([0, 1, 2]), r"GeneratedBatch\.label must be 0"),
    ("index", torch.tensor([0.0, 1.0, 2.0]), r"GeneratedBatch\.index must hold integers"),
    ("index", torch.tensor([-1, 0, 1]), r"GeneratedBatch\.index must be >= 0"),
    ("generator", "", r"GeneratedBatch\.generator"),
    ("category", "3", r"GeneratedBatch\.category must be a list of str"),
    ("defect_type", ["a", 1, "b"], r"GeneratedBatch\.defect_type must hold str"),
    ("params", [1, 2, 3], r"GeneratedBatch\.params must be a list of dicts"),
])
def test_a_malformed_batch_names_the_field(field, value, pattern):
    with pytest.raises((ValueError, TypeError), match=pattern):
        GeneratedBatch(**_fields(**{field: value}))


def test_from_samples_mixes_anomalies_and_normals():
    image = torch.rand(3, H, W)
    anomaly = {"index": 0, "image": image, "label": 1, "category": "3", "defect_type": "x", "sources": ["a", "b"],
               "params": {"gamma": 0.7}}
    normal = {"index": 7, "image": image, "label": 0, "category": "3", "defect_type": "good", "sources": ["n"],
              "params": {"role": "held_out"}}
    batch = GeneratedBatch.from_samples("diffstyle", [anomaly, normal])
    assert batch.index.tolist() == [0, 7] and batch.label.tolist() == [1, 0] and batch.mask is None
    with_mask = GeneratedBatch.from_samples("x", [{**anomaly, "mask": torch.ones(H, W)}, normal])
    assert with_mask.mask[1].sum() == 0 and with_mask.mask[0].sum() == H * W  # a normal gets an all-zero mask
    with pytest.raises(ValueError, match=r"GeneratedBatch\.mask: anomalous sample 1"):
        GeneratedBatch.from_samples("x", [normal | {"mask": torch.zeros(H, W)}, anomaly])


def test_set_writer_add_batch(tmp_path):
    writer = SetWriter(tmp_path / ".shard")
    rows = writer.add_batch(GeneratedBatch(**_fields()))
    assert [r["id"] for r in rows] == ["000004", "000005", "000006"]
    with pytest.raises(TypeError, match="GeneratedBatch, got dict"):
        writer.add_batch(_fields())
    writer.close()
    out = merge_shards([tmp_path / ".shard"], tmp_path / "set", {"generator": "noise_patch"})
    dataset = SyntheticSet(out)
    assert dataset.ids == ["000004", "000005", "000006"] and dataset.rows[0]["mask"] is not None
