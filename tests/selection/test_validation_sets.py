"""Validation sets of a selection task: the generator models (DiffStyle, noise, other dataset) export the same
held-out normals through the one export path; the selection task is read from those sets on disk."""

from __future__ import annotations

import json

import pytest
import torch

from anomgen.data import Digits
from anomgen.data.tasks import TaskView, normal_class, one_vs_rest
from anomgen.diffusion.sde import tiny_score_unet
from anomgen.selection.validation_sets import held_out_normals, selection_task, set_folder

SPLIT = {"n_style": 2, "n_content": 3, "n_held_out": 7}


def _export(model, out, normal="3", batch_size=4):
    from lightning.pytorch import Trainer

    from callbacks.export import SyntheticSetExport
    from datamodules.anomaly import AnomalyDataModule

    dm = AnomalyDataModule(Digits, normal_class=normal, validation="none", eval_batch_size=batch_size)
    export = SyntheticSetExport(str(out))
    Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
            callbacks=[export]).predict(model, datamodule=dm, return_predictions=False)
    return out


def _models(**split):
    from models.baseline_sets import DatasetSetModel, NoiseSetModel
    from models.diffstyle import DiffStyleModel

    split = {**SPLIT, **split}
    torch.manual_seed(0)
    return {"diffstyle": DiffStyleModel(tiny_score_unet("vp", image_size=8, channels=3), num_inference_steps=4,
                                        t_edit=300, t_boost=100, **split),
            "noise": NoiseSetModel(seed=1, **split),
            "digits": DatasetSetModel(Digits(split="test"), seed=2, name="digits", **split)}


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    return {name: _export(model, root / name) for name, model in _models().items()}


@pytest.fixture(scope="module")
def digits():
    return Digits(split="train"), Digits(split="test")


def test_every_set_of_a_task_holds_the_diffstyle_held_out_normals(sets):
    from anomgen.data.synthetic import read_manifest

    rows = {name: read_manifest(folder) for name, folder in sets.items()}
    for name, manifest in rows.items():
        assert [r["label"] for r in manifest] == [1] * 6 + [0] * 7, name  # S·C anomalies, then the held-out normals
        assert {r["generator"] for r in manifest} == {name}
        split = json.loads((sets[name] / "set.json").read_text())["split"]  # the same split recorded by every set
        assert split == {**SPLIT, "split_seed": 0, "support_size": len(normal_class(Digits(split="train"), "3"))}
    normals = rows["diffstyle"][6:]
    for name in ("noise", "digits"):
        assert [(r["id"], r["sources"]) for r in rows[name][6:]] == [(r["id"], r["sources"]) for r in normals]
        for row in normals:  # the same pixels, byte for byte
            assert (sets[name] / row["image"]).read_bytes() == (sets["diffstyle"] / row["image"]).read_bytes()
    assert all(r["sources"] == [] for r in rows["noise"][:6])
    assert len({r["sources"][0] for r in rows["digits"][:6]}) == 6  # drawn without replacement
    assert all(len(r["sources"]) == 2 for r in rows["diffstyle"][:6])


def test_baseline_sets_do_not_depend_on_batching(sets, tmp_path):
    from anomgen.data.synthetic import read_manifest

    again = _export(_models()["noise"], tmp_path / "noise", batch_size=3)
    assert read_manifest(again) == read_manifest(sets["noise"])
    for row in read_manifest(again):
        assert (again / row["image"]).read_bytes() == (sets["noise"] / row["image"]).read_bytes()


def test_selection_task_reads_the_sets_and_builds_the_banks(sets, digits, tmp_path):
    train, test = digits
    support = normal_class(train, "3")
    task = selection_task("3", support, one_vs_rest(test, "3"), sets)
    held = set(held_out_normals(task.validation_sets["noise"]))
    bank = {e.image_path for e in task.synthetic_bank.entries}
    assert len(held) == 7 and len(bank) == len(support) - 7 and not held & bank
    diffstyle_sources = {s for r in task.validation_sets["diffstyle"].rows if r["label"] == 1 for s in r["sources"]}
    assert len(diffstyle_sources) == 5 and diffstyle_sources <= bank  # by default the sources stay in the bank
    strict = selection_task("3", support, one_vs_rest(test, "3"), sets, bank_without_sources=True)
    assert {e.image_path for e in strict.synthetic_bank.entries} == bank - diffstyle_sources
    # a run folder stands for the set it exported
    run = tmp_path / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"complete": True, "outputs": {"synthetic_set": str(sets["noise"])}}))
    assert set_folder(run) == sets["noise"] and set_folder(sets["noise"]) == sets["noise"]


def test_sets_of_another_split_or_task_are_refused(sets, digits, tmp_path):
    train, test = digits
    support = normal_class(train, "3")
    other_split = _export(_models(n_held_out=6)["noise"], tmp_path / "other_split")
    with pytest.raises(ValueError, match="different held-out normals"):
        selection_task("3", support, one_vs_rest(test, "3"), {**sets, "noise": other_split})
    with pytest.raises(ValueError, match="made for another task"):
        selection_task("5", normal_class(train, "5"), one_vs_rest(test, "5"), sets)
    from anomgen.data.synthetic import read_manifest

    used = {s for r in read_manifest(sets["diffstyle"]) for s in r["sources"]}  # held out and sources: 7 + 5
    only_used = TaskView(support, [i for i, e in enumerate(support.entries) if e.image_path in used])
    assert len(only_used) == 12
    with pytest.raises(ValueError, match="no image in the synthetic bank"):
        selection_task("3", only_used, one_vs_rest(test, "3"), {"diffstyle": sets["diffstyle"]},
                       bank_without_sources=True)


def test_other_dataset_needs_enough_images(tmp_path):
    from models.baseline_sets import DatasetSetModel

    few = TaskView(Digits(split="test"), range(4))
    with pytest.raises(ValueError, match="asked for 6 anomalies"):
        _export(DatasetSetModel(few, **SPLIT), tmp_path / "few")
