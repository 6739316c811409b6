"""Validation sets of a selection task: shared held-out normals, banks, DiffStyle / noise / other-dataset builders."""

from __future__ import annotations

import pytest
import torch

from anomgen.data import Digits
from anomgen.data.tasks import normal_class, one_vs_rest
from anomgen.diffusion.sde import tiny_score_unet
from anomgen.selection.validation_sets import DatasetSets, DiffStyleSets, NoiseSets, selection_task


@pytest.fixture(scope="module")
def digits():
    return Digits(split="train"), Digits(split="test")


def _task(digits, tmp_path, **kw):
    train, test = digits
    torch.manual_seed(0)
    builders = {"diffstyle": DiffStyleSets(tiny_score_unet("vp", image_size=8, channels=3), num_inference_steps=4,
                                           t_edit=300, t_boost=100),
                "noise": NoiseSets(seed=1), "digits": DatasetSets(Digits(split="test"), seed=2, name="digits")}
    return selection_task("3", normal_class(train, "3"), one_vs_rest(test, "3"), builders, tmp_path / "sets",
                          n_style=2, n_content=3, n_held_out=7, seed=0, **kw)


def test_sets_share_the_held_out_normals_and_have_s_times_c_anomalies(digits, tmp_path):
    task = _task(digits, tmp_path)
    normals = {}
    for name, dataset in task.validation_sets.items():
        labels = [e.label for e in dataset.entries]
        assert labels.count(1) == 2 * 3 and labels.count(0) == 7, name
        normals[name] = torch.stack([dataset[i]["image"] for i, y in enumerate(labels) if y == 0])
    torch.testing.assert_close(normals["noise"], normals["diffstyle"])
    torch.testing.assert_close(normals["digits"], normals["diffstyle"])
    held = {r["sources"][0] for r in task.validation_sets["noise"].rows if r["label"] == 0}
    bank = {e.image_path for e in task.synthetic_bank.entries}
    assert len(bank) == len(task.bank) - 7 and not held & bank  # the held-out normals left the synthetic bank
    diffstyle_sources = {s for r in task.validation_sets["diffstyle"].rows if r["label"] == 1 for s in r["sources"]}
    assert len(diffstyle_sources) == 5 and diffstyle_sources <= bank  # by default the sources stay in the bank


def test_bank_without_sources_and_reuse_of_finished_sets(digits, tmp_path):
    task = _task(digits, tmp_path, bank_without_sources=True)
    bank = {e.image_path for e in task.synthetic_bank.entries}
    sources = {s for r in task.validation_sets["diffstyle"].rows if r["label"] == 1 for s in r["sources"]}
    assert len(bank) == len(task.bank) - 7 - 5 and not sources & bank
    again = _task(digits, tmp_path, bank_without_sources=True)  # same info: the finished sets are reused as they are
    assert again.validation_sets["noise"].rows == task.validation_sets["noise"].rows
    with pytest.raises(FileExistsError, match="made for"):
        _task(digits, tmp_path, bank_without_sources=False)  # another task definition: refuse, never overwrite


def test_bank_without_sources_needs_a_large_enough_support(digits, tmp_path):
    train, test = digits
    support = normal_class(train, "3")
    from anomgen.data.tasks import TaskView

    small = TaskView(support, range(12))
    with pytest.raises(ValueError, match="no image in the synthetic bank"):
        selection_task("3", small, one_vs_rest(test, "3"), {"noise": NoiseSets()}, tmp_path, 2, 3, n_held_out=7,
                       bank_without_sources=True)
    with pytest.raises(ValueError, match="asked for 6 anomalies"):
        selection_task("3", support, one_vs_rest(test, "3"), {"few": DatasetSets(TaskView(support, range(4)))},
                       tmp_path / "few", 2, 3, n_held_out=7)
