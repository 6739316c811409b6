"""anomgen.files: atomic files and folders, and the one JSON encoder."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from anomgen import files
from anomgen.files import atomic_dir, to_json, write_json


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -------------------------------------------------------------------------------------------------------- atomic_dir


def test_atomic_dir_success_places_the_complete_folder(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-") and tmp.is_dir()
        (tmp / "a.txt").write_text("a")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("b")
        assert not target.exists()  # nothing at the target until the block ends
    assert (target / "a.txt").read_text() == "a" and (target / "sub" / "b.txt").read_text() == "b"
    assert _names(tmp_path) == ["out"]


def test_atomic_dir_exception_leaves_no_target_and_no_temporary_folder(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="crashed"), atomic_dir(target) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("crashed")
    assert _names(tmp_path) == []


def test_atomic_dir_refuses_an_existing_folder_unless_overwrite(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="out.*overwrite=True"), atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _names(target) == ["old.txt"] and _names(tmp_path) == ["out"]

    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _names(target) == ["new.txt"]
    assert _names(tmp_path) == ["out"]  # the old folder moved aside is deleted


def test_atomic_dir_replaces_an_empty_folder(tmp_path):
    (tmp_path / "out").mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
    assert _names(tmp_path / "out") == ["x"]


def test_atomic_dir_exist_ok_keeps_what_another_process_finished(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target, exist_ok=True) as tmp:
        (tmp / "mine.txt").write_text("mine")
        target.mkdir()  # another process finishes first
        (target / "theirs.txt").write_text("theirs")
    assert _names(target) == ["theirs.txt"]
    assert _names(tmp_path) == ["out"]


def test_atomic_dir_failed_swap_restores_the_old_folder(tmp_path, monkeypatch):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    real_rename = files.os.rename

    def rename(src, dst):
        if ".tmp-" in Path(src).name:
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(files.os, "rename", rename)
    with pytest.raises(OSError, match="rename failed"), atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert _names(target) == ["old.txt"] and _names(tmp_path) == ["out"]


# -------------------------------------------------------------------------------------------------------------- JSON


def test_to_json_numbers_tensors_numpy_paths():
    value = {"a": torch.tensor(1.5), "b": np.float32(2.0), "c": np.int64(3), "d": torch.tensor([1, 2]),
             "e": np.arange(3), "f": (1, "x"), "g": Path("/p/q"), "h": [np.bool_(True)], "i": torch.tensor(7)}
    out = to_json(value)
    assert out == {"a": 1.5, "b": 2.0, "c": 3, "d": [1, 2], "e": [0, 1, 2], "f": [1, "x"], "g": "/p/q",
                   "h": [True], "i": 7}
    assert type(out["c"]) is int and type(out["b"]) is float and type(out["i"]) is int
    assert to_json(out, strict=True) == out
    json.dumps(out, allow_nan=False)


def test_to_json_lenient_degrades_and_strict_refuses_naming_the_key():
    bad = {"fid": float("nan"), "inf": torch.tensor(math.inf), "obj": object(), 3: "int key"}
    out = to_json(bad)
    assert out["fid"] is None and out["inf"] is None and out["3"] == "int key" and isinstance(out["obj"], str)
    with pytest.raises(ValueError, match=r"params\.fid.*finite"):
        to_json({"fid": float("nan")}, strict=True, key="params")
    with pytest.raises(ValueError, match=r"params\.x\[1\].*object"):
        to_json({"x": [1, object()]}, strict=True, key="params")
    with pytest.raises(ValueError, match="keys must be strings"):
        to_json({3: 1}, strict=True)


def test_write_json_is_standard_json(tmp_path):
    path = write_json(tmp_path / "sub" / "m.json", {"b": torch.tensor(float("nan")), "a": np.float64(0.25)})
    text = path.read_text()
    assert "NaN" not in text and json.loads(text) == {"a": 0.25, "b": None}
    assert text.index('"a"') < text.index('"b"')  # keys sorted
    assert _names(tmp_path / "sub") == ["m.json"]
