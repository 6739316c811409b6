"""The synthetic-set format: writing (atomic, shard merge), checking, reading, scores and the MVTec-style view."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from anomgen import files
from anomgen.data import synthetic
from anomgen.data.record import RECORD_KEYS, make_record
from anomgen.data.synthetic import (
    SetWriter,
    SyntheticSet,
    check_set,
    export_mvtec_view,
    format_id,
    is_complete_set,
    merge_shards,
    read_manifest,
    shard_path,
    update_scores,
    write_set,
)
from anomgen.errors import SyntheticSetError

H, W = 12, 16
INFO = {"generator": "noise_patch", "config": {"size": 4}, "checkpoint": None, "task": {"normal": "3"}}


def _image(seed: int) -> torch.Tensor:
    return torch.rand(3, H, W, generator=torch.Generator().manual_seed(seed))


def _mask(seed: int) -> torch.Tensor:
    mask = torch.zeros(H, W)
    top, left = seed % (H - 4), seed % (W - 4)
    mask[top : top + 4, left : left + 4] = 1.0
    return mask


def _sample(index: int, label: int = 1, mask: bool = True, category: str = "3", **extra) -> dict:
    sample = {
        "id": format_id(index),
        "image": _image(index),
        "mask": _mask(index) if (mask and label == 1) else None,
        "label": label,
        "generator": "noise_patch",
        "category": category,
        "sources": [f"sklearn-digits:{index:05d}"],
        "params": {"seed": index, "size": torch.tensor(4), "alpha": np.float32(0.5)},
    }
    sample.update(extra)
    return sample


def _write_shard(directory: Path, indices, **kwargs) -> Path:
    writer = SetWriter(directory)
    for i in indices:
        writer.add(**_sample(i, **kwargs))
    writer.close()
    return directory


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# ------------------------------------------------------------------------------------------------------------ writing


def test_format_id():
    assert format_id(42) == "000042"
    assert format_id(0) == "000000"
    assert format_id(1234567) == "1234567"
    with pytest.raises(ValueError):
        format_id(-1)
    with pytest.raises(TypeError):
        format_id("42")


def test_round_trip(tmp_path):
    samples = [_sample(0), _sample(1, mask=False), _sample(2, label=0), _sample(3, defect_type="scratch")]
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


def test_manifest_sorted_each_id_once(tmp_path):
    order = [5, 1000000, 3, 0, 42]
    out = write_set(tmp_path / "set", [_sample(i) for i in order], INFO)
    lines = (out / "manifest.jsonl").read_text().splitlines()
    ids = [json.loads(line)["id"] for line in lines]
    assert ids == ["000000", "000003", "000005", "000042", "1000000"]
    assert [r["id"] for r in read_manifest(out)] == ids
    row = json.loads(lines[0])
    assert list(row) == list(synthetic.ROW_KEYS)
    assert row["image"] == "images/000000.png" and row["mask"] == "masks/000000.png"


def test_writer_rejects_duplicates_and_bad_values(tmp_path):
    writer = SetWriter(tmp_path / "shard")
    writer.add(**_sample(1))
    with pytest.raises(SyntheticSetError, match="000001.*already written"):
        writer.add(**_sample(1))
    with pytest.raises(SyntheticSetError, match="params.bad"):
        writer.add(**_sample(2, params={"ok": 1, "bad": object()}))
    with pytest.raises(SyntheticSetError, match=r"params\.fid.*finite"):  # the manifest is standard JSON: no NaN
        writer.add(**_sample(2, params={"fid": float("nan")}))
    with pytest.raises(SyntheticSetError, match=r"\[0, 1\]"):
        writer.add(**_sample(3, image=_image(3) * 2 - 1))
    with pytest.raises(SyntheticSetError, match="3×H×W"):
        writer.add(**_sample(4, image=torch.rand(H, W)))
    with pytest.raises(SyntheticSetError, match="mask"):
        writer.add(**_sample(5, mask=False) | {"mask": torch.ones(H + 1, W)})
    with pytest.raises(SyntheticSetError, match="format_id"):
        writer.add(**_sample(6) | {"id": 6})
    with pytest.raises(SyntheticSetError, match="normal sample"):
        writer.add(**_sample(7, label=0) | {"mask": _mask(7)})
    assert [r["id"] for r in writer.rows] == ["000001"]
    writer.close()
    assert not (tmp_path / "shard" / "set.json").exists()  # a shard is never a set
    with pytest.raises(SyntheticSetError, match="closed"):
        writer.add(**_sample(8))
    # a non-empty shard folder is refused unless emptied on purpose
    with pytest.raises(SyntheticSetError, match="not empty"):
        SetWriter(tmp_path / "shard")
    assert len(SetWriter(tmp_path / "shard", overwrite=True)) == 0
    assert not (tmp_path / "shard" / "manifest.jsonl").exists()


def test_mask_binarised_with_greater_than_zero(tmp_path):
    mask = torch.zeros(H, W, dtype=torch.uint8)
    mask[2:5, 3:7] = 2  # VisA-style small integers
    out = write_set(tmp_path / "set", [_sample(0) | {"mask": mask}], INFO)
    assert torch.equal(SyntheticSet(out)[0]["mask"], (mask > 0).float())


# -------------------------------------------------------------------------------------------------------------- merge


def test_merge_keeps_identical_overlap_once(tmp_path):
    a = _write_shard(shard_path(tmp_path / "set", 0), [0, 2, 4])
    b = _write_shard(shard_path(tmp_path / "set", 1), [1, 3, 4])  # 4 repeated, as a padding DDP sampler does
    out = merge_shards([a, b], tmp_path / "set", INFO)
    rows = read_manifest(out)
    assert [r["id"] for r in rows] == [format_id(i) for i in range(5)]
    assert json.loads((out / "set.json").read_text())["counts"]["total"] == 5
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{format_id(i)}.png" for i in range(5)]
    assert not a.exists() and not b.exists()  # shards removed after a successful merge
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    ds = SyntheticSet(out)
    assert (ds[4]["image"] - _image(4)).abs().max() <= 0.5 / 255 + 1e-6


def test_merge_rejects_differing_overlap(tmp_path):
    a = _write_shard(tmp_path / "a", [0, 1])
    b = SetWriter(tmp_path / "b")
    b.add(**_sample(1) | {"image": _image(99)})  # same id, other pixels
    b.close()
    with pytest.raises(SyntheticSetError, match="000001.*different content"):
        merge_shards([a, b.directory], tmp_path / "set", INFO)
    assert not (tmp_path / "set").exists()
    assert a.exists() and b.directory.exists()  # nothing lost: the merge can be fixed and retried
    assert _leftovers(tmp_path) == []

    c = SetWriter(tmp_path / "c")
    c.add(**_sample(1) | {"params": {"seed": 1, "size": 5, "alpha": 0.5}})  # same pixels, other params
    c.close()
    with pytest.raises(SyntheticSetError, match="different content"):
        merge_shards([a, c.directory], tmp_path / "set", INFO)


def test_merge_requires_closed_shards(tmp_path):
    writer = SetWriter(tmp_path / "open")
    writer.add(**_sample(0))
    with pytest.raises(SyntheticSetError, match="never closed"):
        merge_shards([writer.directory], tmp_path / "set", INFO)
    assert not (tmp_path / "set").exists()


def test_refuse_overwrite_then_overwrite(tmp_path):
    out = write_set(tmp_path / "set", [_sample(0), _sample(1)], INFO)
    with pytest.raises(SyntheticSetError, match="already exists.*overwrite=True"):
        write_set(out, [_sample(5)], INFO)
    assert [r["id"] for r in read_manifest(out)] == ["000000", "000001"]
    shard = _write_shard(tmp_path / "shard", [7])
    with pytest.raises(SyntheticSetError, match="already exists"):
        merge_shards([shard], out, INFO)
    assert shard.exists()

    write_set(out, [_sample(5)], {**INFO, "config": {"size": 9}}, overwrite=True)
    check_set(out)
    assert [r["id"] for r in read_manifest(out)] == ["000005"]
    assert not (out / "images" / "000000.png").exists()
    assert json.loads((out / "set.json").read_text())["config"] == {"size": 9}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set", "shard"]

    # an empty folder (e.g. made by a config) is no set to protect
    (tmp_path / "empty").mkdir()
    write_set(tmp_path / "empty", [_sample(0)], INFO)
    assert is_complete_set(tmp_path / "empty")
    assert len(SyntheticSet(tmp_path / "empty", labels=1)) == 1 and len(SyntheticSet(tmp_path / "empty", labels=0)) == 0

    # overwrite never replaces a folder that is not a set
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(SyntheticSetError, match="not a synthetic set"):
        write_set(other, [_sample(0)], INFO, overwrite=True)
    assert (other / "holiday.jpg").exists()


# --------------------------------------------------------------------------------------------------------- atomicity


def test_failure_during_write_leaves_nothing(tmp_path):
    def samples():
        yield _sample(0)
        yield _sample(1)
        raise RuntimeError("generator crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        write_set(tmp_path / "set", samples(), INFO)
    assert list(tmp_path.iterdir()) == []


def test_failure_during_merge_keeps_old_set(tmp_path, monkeypatch):
    out = write_set(tmp_path / "set", [_sample(0), _sample(1)], INFO)
    old_manifest = (out / "manifest.jsonl").read_text()
    old_image = (out / "images" / "000000.png").read_bytes()

    def broken(set_info, rows):
        raise OSError("disk full")

    monkeypatch.setattr(synthetic.writer, "_set_info_json", broken)
    with pytest.raises(OSError, match="disk full"):
        write_set(tmp_path / "new", [_sample(2)], INFO)
    assert not (tmp_path / "new").exists()
    with pytest.raises(OSError, match="disk full"):
        write_set(out, [_sample(3), _sample(4)], INFO, overwrite=True)
    assert (out / "manifest.jsonl").read_text() == old_manifest
    assert (out / "images" / "000000.png").read_bytes() == old_image
    check_set(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_failure_during_swap_restores_old_set(tmp_path, monkeypatch):
    out = write_set(tmp_path / "set", [_sample(0)], INFO)
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in Path(src).name and Path(dst) == out:
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(files.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        write_set(out, [_sample(3)], INFO, overwrite=True)
    monkeypatch.undo()
    check_set(out)
    assert [r["id"] for r in read_manifest(out)] == ["000000"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


# ------------------------------------------------------------------------------------------------------------- check


@pytest.fixture
def good_set(tmp_path) -> Path:
    return write_set(tmp_path / "set", [_sample(0), _sample(1), _sample(2, label=0)], INFO)


def _expect_incomplete(path: Path, pattern: str) -> None:
    assert not is_complete_set(path)
    with pytest.raises(SyntheticSetError, match=pattern):
        check_set(path)
    with pytest.raises(SyntheticSetError, match=pattern):
        SyntheticSet(path)


def test_check_missing_set_json(good_set):
    (good_set / "set.json").unlink()
    _expect_incomplete(good_set, "missing set.json")


def test_check_missing_manifest(good_set):
    (good_set / "manifest.jsonl").unlink()
    _expect_incomplete(good_set, "missing manifest.jsonl")


def test_check_malformed_manifest_line(good_set):
    lines = (good_set / "manifest.jsonl").read_text().splitlines()
    lines[1] = lines[1][:-5]  # truncated JSON on line 2
    (good_set / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    _expect_incomplete(good_set, "line 2: malformed manifest line")


def test_check_manifest_line_missing_key(good_set):
    lines = (good_set / "manifest.jsonl").read_text().splitlines()
    row = json.loads(lines[2])
    del row["label"]
    lines[2] = json.dumps(row)
    (good_set / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    _expect_incomplete(good_set, "line 3: malformed manifest line: missing key.*label")


def test_check_missing_image_file(good_set):
    (good_set / "images" / "000001.png").unlink()
    _expect_incomplete(good_set, r"missing: images/000001\.png")


def test_check_missing_mask_file(good_set):
    (good_set / "masks" / "000000.png").unlink()
    _expect_incomplete(good_set, r"missing: masks/000000\.png \(mask of sample 000000\)")


def test_check_counts_disagree(good_set):
    info = json.loads((good_set / "set.json").read_text())
    info["counts"]["total"] = 7
    (good_set / "set.json").write_text(json.dumps(info))
    _expect_incomplete(good_set, "counts.total is 7 but manifest.jsonl gives 3")


def test_check_duplicate_and_unsorted(good_set):
    lines = (good_set / "manifest.jsonl").read_text().splitlines()
    (good_set / "manifest.jsonl").write_text("\n".join([lines[1], lines[0], lines[2]]) + "\n")
    _expect_incomplete(good_set, "not sorted by id")
    (good_set / "manifest.jsonl").write_text("\n".join([lines[0], lines[0], lines[1], lines[2]]) + "\n")
    _expect_incomplete(good_set, "more than once: 000000")


def test_leftover_temporary_folder_is_not_a_set(good_set, tmp_path):
    leftover = tmp_path / ".set.tmp-0123456789"
    os.rename(good_set, leftover)  # a complete-looking build that never got renamed
    _expect_incomplete(leftover, "leftover temporary folder")


def test_shard_is_not_a_set(tmp_path):
    shard = _write_shard(tmp_path / "rank0", [0, 1])
    _expect_incomplete(shard, "missing set.json.*not a finished synthetic set")
    _expect_incomplete(tmp_path / "nowhere", "not found")


# ------------------------------------------------------------------------------------------------------------ scores


def test_update_scores(good_set):
    update_scores(good_set, {"000001": {"eap": torch.tensor(0.25)}, "000002": {"eap": 0.75, "rarity": 3}})
    update_scores(good_set, {"000001": {"rarity": 1.5}})
    rows = {r["id"]: r for r in read_manifest(good_set)}
    assert rows["000000"]["scores"] == {}
    assert rows["000001"]["scores"] == {"eap": 0.25, "rarity": 1.5}
    assert rows["000002"]["scores"] == {"eap": 0.75, "rarity": 3}
    check_set(good_set)
    assert SyntheticSet(good_set).rows[1]["scores"]["eap"] == 0.25

    before = (good_set / "manifest.jsonl").read_text()
    with pytest.raises(SyntheticSetError, match="not in the set: 000009"):
        update_scores(good_set, {"000000": {"eap": 1.0}, "000009": {"eap": 1.0}})
    assert (good_set / "manifest.jsonl").read_text() == before
    assert sorted(p.name for p in good_set.iterdir()) == ["images", "manifest.jsonl", "masks", "set.json"]


# ------------------------------------------------------------------------------------------------------- MVTec view


class _MemoryNormals(torch.utils.data.Dataset):
    """Normals held in memory: records whose image_path is an id, not a file."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> dict:
        return make_record(_image(100 + i), 0, None, f"sklearn-digits:{i:05d}", None, "3", "real", "good")


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
        assert np.abs(np.asarray(img, dtype=np.float32) / 255 - _image(101).permute(1, 2, 0).numpy()).max() < 0.51 / 255
    assert _leftovers(view) == []

    with pytest.raises(SyntheticSetError, match="already exists.*overwrite=True"):
        export_mvtec_view(good_set, view)
    export_mvtec_view(good_set, view, overwrite=True)  # no normals this time
    assert not (view / "3" / "train").exists()


def test_export_view_links_files(good_set, tmp_path):
    normals = write_set(tmp_path / "normals", [_sample(10, label=0), _sample(11, label=0)], INFO)
    view = export_mvtec_view(good_set, tmp_path / "view", normals=SyntheticSet(normals), link=True)
    linked = view / "3/test/noise_patch/000000.png"
    assert linked.is_symlink() and linked.resolve() == (good_set / "images/000000.png").resolve()
    assert (view / "3/ground_truth/noise_patch/000000_mask.png").is_symlink()
    train = sorted(p.name for p in (view / "3/train/good").iterdir())
    assert train == ["000000_000010.png", "000001_000011.png"]
    assert (view / "3/train/good" / train[0]).resolve() == (normals / "images/000010.png").resolve()


def test_export_view_missing_masks_and_categories(tmp_path):
    out = write_set(
        tmp_path / "set", [_sample(0), _sample(1, mask=False), _sample(2, category="7")], INFO
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
