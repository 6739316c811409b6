"""anomgen.data.synthetic.format: ids, and the validation of manifest.jsonl and set.json (what makes a folder a
complete set)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from synthetic_samples import write_shard

from anomgen.data.synthetic import SyntheticSet, check_set, format_id, is_complete_set
from anomgen.errors import SyntheticSetError


def test_format_id():
    assert format_id(42) == "000042"
    assert format_id(0) == "000000"
    assert format_id(1234567) == "1234567"
    with pytest.raises(ValueError):
        format_id(-1)
    with pytest.raises(TypeError):
        format_id("42")



# ------------------------------------------------------------------------------------------------------------- check


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


def test_a_symbolic_link_out_of_the_set_is_refused(good_set, tmp_path):
    """A listed file that is a symbolic link to a file outside the set is refused as `..` in the manifest is: reading
    a set never reads anything else. A link that stays inside the set is harmless."""
    rows = [json.loads(line) for line in (good_set / "manifest.jsonl").read_text().splitlines()]
    outside = tmp_path / "outside.png"
    outside.write_bytes((good_set / rows[0]["image"]).read_bytes())
    (good_set / rows[1]["image"]).unlink()
    os.symlink(good_set / rows[0]["image"], good_set / rows[1]["image"])  # inside the set: fine
    check_set(good_set)
    (good_set / rows[0]["image"]).unlink()
    os.symlink(outside, good_set / rows[0]["image"])
    _expect_incomplete(good_set, rf"image {rows[0]['image']} of sample '000000' leads out of the set through a "
                                 rf"symbolic link \(to {outside}\)")


def test_a_linked_folder_out_of_the_set_is_refused(good_set, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    os.rename(good_set / "masks", elsewhere)
    os.symlink(elsewhere, good_set / "masks")
    _expect_incomplete(good_set, "mask masks/000000.png of sample '000000' leads out of the set")


def test_leftover_temporary_folder_is_not_a_set(good_set, tmp_path):
    leftover = tmp_path / ".set.tmp-0123456789"
    os.rename(good_set, leftover)  # a complete-looking build that never got renamed
    _expect_incomplete(leftover, "leftover temporary folder")


def test_shard_is_not_a_set(tmp_path):
    shard = write_shard(tmp_path / "rank0", [0, 1])
    _expect_incomplete(shard, "missing set.json.*not a finished synthetic set")
    _expect_incomplete(tmp_path / "nowhere", "not found")
