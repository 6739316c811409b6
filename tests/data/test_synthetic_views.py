"""anomgen.data.synthetic.views: the MVTec-style view of a set."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic_samples import INFO, image_of, leftovers, make_sample

from anomgen.data.record import make_record
from anomgen.data.synthetic import SyntheticSet, export_mvtec_view, write_set
from anomgen.errors import SyntheticSetError

# ------------------------------------------------------------------------------------------------------- MVTec view


class _MemoryNormals(torch.utils.data.Dataset):
    """Normals held in memory: records whose image_path is an id, not a file."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> dict:
        return make_record(image_of(100 + i), 0, None, f"sklearn-digits:{i:05d}", None, "3", "real", "good")


def test_export_view_layout(good_set, tmp_path):
    view = export_mvtec_view(good_set, tmp_path / "view", normals=_MemoryNormals(), link=False)
    assert view == tmp_path / "view"
    files = sorted(str(p.relative_to(view)) for p in view.rglob("*") if p.is_file())
    assert files == [
        "3/ground_truth/noise_patch/000000_mask.png",
        "3/ground_truth/noise_patch/000001_mask.png",
        "3/test/good/000002.png",
        "3/test/noise_patch/000000.png",
        "3/test/noise_patch/000001.png",
        "3/train/good/000000.png",
        "3/train/good/000001.png",
    ]
    assert not any(p.is_symlink() for p in view.rglob("*"))
    assert (view / "3/test/noise_patch/000001.png").read_bytes() == (good_set / "images/000001.png").read_bytes()
    with Image.open(view / "3/train/good/000001.png") as img:
        expected = image_of(101).permute(1, 2, 0).numpy()
        assert np.abs(np.asarray(img, dtype=np.float32) / 255 - expected).max() < 0.51 / 255
    assert leftovers(view) == []

    with pytest.raises(SyntheticSetError, match="already exists.*overwrite=True"):
        export_mvtec_view(good_set, view)
    export_mvtec_view(good_set, view, overwrite=True)  # no normals this time
    assert not (view / "3" / "train").exists()


def test_export_view_links_files(good_set, tmp_path):
    normals = write_set(tmp_path / "normals", [make_sample(10, label=0), make_sample(11, label=0)], INFO)
    view = export_mvtec_view(good_set, tmp_path / "view", normals=SyntheticSet(normals), link=True)
    linked = view / "3/test/noise_patch/000000.png"
    assert linked.is_symlink() and linked.resolve() == (good_set / "images/000000.png").resolve()
    assert (view / "3/ground_truth/noise_patch/000000_mask.png").is_symlink()
    train = sorted(p.name for p in (view / "3/train/good").iterdir())
    assert train == ["000000_000010.png", "000001_000011.png"]
    assert (view / "3/train/good" / train[0]).resolve() == (normals / "images/000010.png").resolve()


def test_export_view_missing_masks_and_categories(tmp_path):
    out = write_set(
        tmp_path / "set", [make_sample(0), make_sample(1, mask=False), make_sample(2, category="7")], INFO
    )
    with pytest.raises(SyntheticSetError, match="several categories.*3, 7"):
        export_mvtec_view(out, tmp_path / "view")
    with pytest.raises(SyntheticSetError, match="without a mask: 000001"):
        export_mvtec_view(out, tmp_path / "view", category="3")
    assert not (tmp_path / "view" / "3").exists()
    with pytest.warns(UserWarning, match="without a ground-truth mask"):
        export_mvtec_view(out, tmp_path / "view", category="3", allow_missing_masks=True)
    assert (tmp_path / "view/3/test/noise_patch/000001.png").exists()
    assert not (tmp_path / "view/3/ground_truth/noise_patch/000001_mask.png").exists()
    export_mvtec_view(out, tmp_path / "view", category="7")
    assert sorted(p.name for p in (tmp_path / "view").iterdir()) == ["3", "7"]
    with pytest.raises(SyntheticSetError, match="no sample of category 'cat'"):
        export_mvtec_view(out, tmp_path / "view", category="cat")


def test_export_view_read_by_folder_parser(good_set, tmp_path):
    from anomgen.data.folder import Folder

    view = export_mvtec_view(good_set, tmp_path / "view", normals=_MemoryNormals())
    test = Folder(view, category="3", split="test")
    records = sorted((test[i] for i in range(len(test))), key=lambda r: Path(r["image_path"]).name)
    assert len(records) == 3
    source = SyntheticSet(good_set)
    for record, expected in zip(records, (source[i] for i in range(3))):
        assert record["label"] == expected["label"]
        assert record["defect_type"] == expected["defect_type"]
        assert torch.equal(record["mask"], expected["mask"])
        assert torch.allclose(record["image"], expected["image"])
    assert records[0]["mask"].sum() > 0 and records[2]["label"] == 0
    train = Folder(view, category="3", split="train")
    assert len(train) == 2 and all(train[i]["label"] == 0 for i in range(2))
