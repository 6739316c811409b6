"""SyntheticSetExport takes a GeneratedBatch only, checks its target as the merge does, drops leftovers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import LightningModule

from anomgen.data.synthetic import merge_shards
from anomgen.errors import SyntheticSetError
from callbacks.export import SyntheticSetExport


class DictGenerator(LightningModule):
    pass


def test_a_dict_from_predict_step_is_a_type_error_naming_the_model(tmp_path):
    export = SyntheticSetExport(str(tmp_path / "set"))
    outputs = {"index": torch.tensor([0]), "image": torch.rand(1, 3, 4, 4)}
    with pytest.raises(TypeError, match=r"DictGenerator\.predict_step must return an .*GeneratedBatch, got dict"):
        export.on_predict_batch_end(None, DictGenerator(), outputs, None, 0)


def test_check_target_is_the_merge_s_own_check(tmp_path):
    """What train.py checks before fitting is what the merge checks after predicting: nothing passes the first and
    fails the second (e.g. overwrite=True on a folder that is not a set), so no training is wasted."""
    folder = tmp_path / "not_a_set"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(SyntheticSetError, match="not_a_set already exists; pass overwrite=True "
                                                r"\(callbacks.synthetic_set_export.overwrite=true"):
        SyntheticSetExport(str(folder)).check_target()
    with pytest.raises(SyntheticSetError, match="not_a_set exists and is not a synthetic set"):
        SyntheticSetExport(str(folder), overwrite=True).check_target()
    with pytest.raises(SyntheticSetError, match="not a synthetic set"):
        merge_shards([], folder, {}, overwrite=True)
    (tmp_path / "empty").mkdir()
    SyntheticSetExport(str(tmp_path / "empty")).check_target()  # an empty folder holds nothing to lose
    SyntheticSetExport(str(tmp_path / "new")).check_target()


def test_predict_start_removes_leftover_shards_and_temporary_builds(tmp_path):
    leftovers = [tmp_path / ".the_set.shard-1", tmp_path / ".the_set.tmp-4242-0a1b2c3d"]
    kept = [tmp_path / ".the_set.old-4242-0a1b2c3d",  # may be the only copy of a set being replaced: kept
            tmp_path / ".the_set2.tmp-4242-0a1b2c3d", tmp_path / ".other.shard-0"]
    for folder in leftovers + kept:
        (folder / "images").mkdir(parents=True)
        (folder / "images" / "000000.png").write_bytes(b"png")
    trainer = SimpleNamespace(is_global_zero=True, global_rank=0, strategy=SimpleNamespace(barrier=lambda name: None))
    export = SyntheticSetExport(str(tmp_path / "the_set"))
    export.on_predict_start(trainer, LightningModule())
    assert not any(p.exists() for p in leftovers)
    assert all(p.is_dir() for p in kept)
    assert (tmp_path / ".the_set.shard-0").is_dir()  # rank 0's new shard, being written
    assert not (tmp_path / "the_set").exists()
