"""anomgen.data.synthetic.writer: SetWriter, shard merging (each id once, overwrite rules), atomic writes,
scores."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from synthetic_samples import (
    INFO,
    H,
    W,
    image_of,
    leftovers,
    make_sample,
    mask_of,
    write_shard,
)

from anomgen import files
from anomgen.data import synthetic
from anomgen.data.synthetic import (
    SetWriter,
    SyntheticSet,
    check_set,
    format_id,
    is_complete_set,
    merge_shards,
    read_manifest,
    shard_path,
    update_scores,
    write_set,
)
from anomgen.errors import SyntheticSetError

# ------------------------------------------------------------------------------------------------------------ writing


def test_manifest_sorted_each_id_once(tmp_path):
    order = [5, 1000000, 3, 0, 42]
    out = write_set(tmp_path / "set", [make_sample(i) for i in order], INFO)
    lines = (out / "manifest.jsonl").read_text().splitlines()
    ids = [json.loads(line)["id"] for line in lines]
    assert ids == ["000000", "000003", "000005", "000042", "1000000"]
    assert [r["id"] for r in read_manifest(out)] == ids
    row = json.loads(lines[0])
    assert list(row) == list(synthetic.ROW_KEYS)
    assert row["image"] == "images/000000.png" and row["mask"] == "masks/000000.png"


def test_writer_rejects_duplicates_and_bad_values(tmp_path):
    writer = SetWriter(tmp_path / "shard")
    writer.add(**make_sample(1))
    with pytest.raises(SyntheticSetError, match="000001.*already written"):
        writer.add(**make_sample(1))
    with pytest.raises(SyntheticSetError, match="params.bad"):
        writer.add(**make_sample(2, params={"ok": 1, "bad": object()}))
    with pytest.raises(SyntheticSetError, match=r"params\.fid.*finite"):  # the manifest is standard JSON: no NaN
        writer.add(**make_sample(2, params={"fid": float("nan")}))
    with pytest.raises(SyntheticSetError, match=r"\[0, 1\]"):
        writer.add(**make_sample(3, image=image_of(3) * 2 - 1))
    with pytest.raises(SyntheticSetError, match="3×H×W"):
        writer.add(**make_sample(4, image=torch.rand(H, W)))
    with pytest.raises(SyntheticSetError, match="mask"):
        writer.add(**make_sample(5, mask=False) | {"mask": torch.ones(H + 1, W)})
    with pytest.raises(SyntheticSetError, match="format_id"):
        writer.add(**make_sample(6) | {"id": 6})
    with pytest.raises(SyntheticSetError, match="normal sample"):
        writer.add(**make_sample(7, label=0) | {"mask": mask_of(7)})
    assert [r["id"] for r in writer.rows] == ["000001"]
    writer.close()
    assert not (tmp_path / "shard" / "set.json").exists()  # a shard is never a set
    with pytest.raises(SyntheticSetError, match="closed"):
        writer.add(**make_sample(8))
    # a non-empty shard folder is refused unless emptied on purpose
    with pytest.raises(SyntheticSetError, match="not empty"):
        SetWriter(tmp_path / "shard")
    assert len(SetWriter(tmp_path / "shard", overwrite=True)) == 0
    assert not (tmp_path / "shard" / "manifest.jsonl").exists()


def test_mask_binarised_with_greater_than_zero(tmp_path):
    mask = torch.zeros(H, W, dtype=torch.uint8)
    mask[2:5, 3:7] = 2  # VisA-style small integers
    out = write_set(tmp_path / "set", [make_sample(0) | {"mask": mask}], INFO)
    assert torch.equal(SyntheticSet(out)[0]["mask"], (mask > 0).float())


# -------------------------------------------------------------------------------------------------------------- merge


def test_merge_keeps_identical_overlap_once(tmp_path):
    a = write_shard(shard_path(tmp_path / "set", 0), [0, 2, 4])
    b = write_shard(shard_path(tmp_path / "set", 1), [1, 3, 4])  # 4 repeated, as a padding DDP sampler does
    out = merge_shards([a, b], tmp_path / "set", INFO)
    rows = read_manifest(out)
    assert [r["id"] for r in rows] == [format_id(i) for i in range(5)]
    assert json.loads((out / "set.json").read_text())["counts"]["total"] == 5
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{format_id(i)}.png" for i in range(5)]
    assert not a.exists() and not b.exists()  # shards removed after a successful merge
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
    ds = SyntheticSet(out)
    assert (ds[4]["image"] - image_of(4)).abs().max() <= 0.5 / 255 + 1e-6


def test_merge_rejects_differing_overlap(tmp_path):
    a = write_shard(tmp_path / "a", [0, 1])
    b = SetWriter(tmp_path / "b")
    b.add(**make_sample(1) | {"image": image_of(99)})  # same id, other pixels
    b.close()
    with pytest.raises(SyntheticSetError, match="000001.*different content"):
        merge_shards([a, b.directory], tmp_path / "set", INFO)
    assert not (tmp_path / "set").exists()
    assert a.exists() and b.directory.exists()  # nothing lost: the merge can be fixed and retried
    assert leftovers(tmp_path) == []

    c = SetWriter(tmp_path / "c")
    c.add(**make_sample(1) | {"params": {"seed": 1, "size": 5, "alpha": 0.5}})  # same pixels, other params
    c.close()
    with pytest.raises(SyntheticSetError, match="different content"):
        merge_shards([a, c.directory], tmp_path / "set", INFO)


def test_merge_requires_closed_shards(tmp_path):
    writer = SetWriter(tmp_path / "open")
    writer.add(**make_sample(0))
    with pytest.raises(SyntheticSetError, match="never closed"):
        merge_shards([writer.directory], tmp_path / "set", INFO)
    assert not (tmp_path / "set").exists()


def test_refuse_overwrite_then_overwrite(tmp_path):
    out = write_set(tmp_path / "set", [make_sample(0), make_sample(1)], INFO)
    with pytest.raises(SyntheticSetError, match="already exists.*overwrite=True"):
        write_set(out, [make_sample(5)], INFO)
    assert [r["id"] for r in read_manifest(out)] == ["000000", "000001"]
    shard = write_shard(tmp_path / "shard", [7])
    with pytest.raises(SyntheticSetError, match="already exists"):
        merge_shards([shard], out, INFO)
    assert shard.exists()

    write_set(out, [make_sample(5)], {**INFO, "config": {"size": 9}}, overwrite=True)
    check_set(out)
    assert [r["id"] for r in read_manifest(out)] == ["000005"]
    assert not (out / "images" / "000000.png").exists()
    assert json.loads((out / "set.json").read_text())["config"] == {"size": 9}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set", "shard"]

    # an empty folder (e.g. made by a config) is no set to protect
    (tmp_path / "empty").mkdir()
    write_set(tmp_path / "empty", [make_sample(0)], INFO)
    assert is_complete_set(tmp_path / "empty")
    assert len(SyntheticSet(tmp_path / "empty", labels=1)) == 1 and len(SyntheticSet(tmp_path / "empty", labels=0)) == 0

    # overwrite never replaces a folder that is not a set
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(SyntheticSetError, match="not a synthetic set"):
        write_set(other, [make_sample(0)], INFO, overwrite=True)
    assert (other / "holiday.jpg").exists()


# --------------------------------------------------------------------------------------------------------- atomicity


def test_failure_during_write_leaves_nothing(tmp_path):
    def samples():
        yield make_sample(0)
        yield make_sample(1)
        raise RuntimeError("generator crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        write_set(tmp_path / "set", samples(), INFO)
    assert list(tmp_path.iterdir()) == []


def test_failure_during_merge_keeps_old_set(tmp_path, monkeypatch):
    out = write_set(tmp_path / "set", [make_sample(0), make_sample(1)], INFO)
    old_manifest = (out / "manifest.jsonl").read_text()
    old_image = (out / "images" / "000000.png").read_bytes()

    def broken(set_info, rows):
        raise OSError("disk full")

    monkeypatch.setattr(synthetic.writer, "_set_info_json", broken)
    with pytest.raises(OSError, match="disk full"):
        write_set(tmp_path / "new", [make_sample(2)], INFO)
    assert not (tmp_path / "new").exists()
    with pytest.raises(OSError, match="disk full"):
        write_set(out, [make_sample(3), make_sample(4)], INFO, overwrite=True)
    assert (out / "manifest.jsonl").read_text() == old_manifest
    assert (out / "images" / "000000.png").read_bytes() == old_image
    check_set(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_failure_during_swap_restores_old_set(tmp_path, monkeypatch):
    out = write_set(tmp_path / "set", [make_sample(0)], INFO)
    real_rename = os.rename

    def rename(src, dst):
        if ".tmp-" in Path(src).name and Path(dst) == out:
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(files.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"):
        write_set(out, [make_sample(3)], INFO, overwrite=True)
    monkeypatch.undo()
    check_set(out)
    assert [r["id"] for r in read_manifest(out)] == ["000000"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


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


def test_merge_refuses_a_shard_file_linked_out_of_the_shard(tmp_path):
    """The merge hard-links shard files into the set: a symbolic link out of the shard would copy that file in."""
    shard = write_shard(tmp_path / ".out.shard-0", [0, 1])
    row = read_manifest(shard)[1]
    secret = tmp_path / "secret.png"
    os.rename(shard / row["image"], secret)
    os.symlink(secret, shard / row["image"])
    with pytest.raises(SyntheticSetError, match=rf"image {row['image']} of sample '000001' leads out of the set"):
        merge_shards([shard], tmp_path / "out", INFO)
    assert not (tmp_path / "out").exists()
