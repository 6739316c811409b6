"""anomgen.data.synthetic.reader: a written set read back as records (SyntheticSet), files on disk."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from synthetic_samples import INFO, H, W, make_sample

from anomgen.data.record import RECORD_KEYS
from anomgen.data.synthetic import SyntheticSet, check_set, is_complete_set, write_set


def test_round_trip(tmp_path):
    samples = [make_sample(0), make_sample(1, mask=False), make_sample(2, label=0),
               make_sample(3, defect_type="scratch")]
    out = write_set(tmp_path / "set", samples, INFO)
    assert out == tmp_path / "set"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no temporary folder left behind
    check_set(out)
    assert is_complete_set(out)

    ds = SyntheticSet(out)
    assert len(ds) == 4
    for i, sample in enumerate(samples):
        record = ds[i]
        assert set(record) == set(RECORD_KEYS)
        assert record["image"].shape == (3, H, W)
        assert (record["image"] - sample["image"]).abs().max() <= 0.5 / 255 + 1e-6
        expected_mask = sample["mask"] if sample["mask"] is not None else torch.zeros(H, W)
        assert torch.equal(record["mask"], expected_mask)
        assert record["label"] == sample["label"]
        assert record["category"] == "3"
        assert record["source"] == "noise_patch"
        assert Path(record["image_path"]).is_absolute() and Path(record["image_path"]).is_file()
        if sample["mask"] is None:
            assert record["mask_path"] == ""
        else:
            assert Path(record["mask_path"]).is_file()
    assert [r["defect_type"] for r in (ds[i] for i in range(4))] == ["noise_patch", "noise_patch", "good", "scratch"]
    assert ds.rows[0]["sources"] == ["sklearn-digits:00000"]
    assert ds.rows[0]["params"] == {"seed": 0, "size": 4, "alpha": 0.5}
    assert ds.entries[2].label == 0 and ds.entries[2].mask_path is None and ds.entries[0].source == "noise_patch"

    info = ds.info
    assert info["format_version"] == 1
    assert info["generator"] == "noise_patch" and info["config"] == {"size": 4} and info["task"] == {"normal": "3"}
    assert info["counts"]["total"] == 4 and info["counts"]["anomalous"] == 3 and info["counts"]["normal"] == 1
    assert info["counts"]["by_defect_type"] == {"good": 1, "noise_patch": 2, "scratch": 1}
    assert "created_at" in info and "code_version" in info

    anomalous = SyntheticSet(out, labels=(1,))
    assert [r["id"] for r in anomalous.rows] == ["000000", "000001", "000003"]
    assert all(anomalous[i]["label"] == 1 for i in range(len(anomalous)))

    resized = SyntheticSet(out, image_size=8)[0]
    assert resized["image"].shape == (3, 8, 8) and resized["mask"].shape == (8, 8)
    assert set(resized["mask"].unique().tolist()) <= {0.0, 1.0}

    # files on disk: RGB 8-bit images, L masks holding 0 / 255
    with Image.open(out / "images" / "000000.png") as img:
        assert img.mode == "RGB"
    with Image.open(out / "masks" / "000000.png") as img:
        assert img.mode == "L" and set(np.unique(np.asarray(img)).tolist()) == {0, 255}
