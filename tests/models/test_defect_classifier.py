"""model=defect_classifier with datamodule=defect_types: trained on a synthetic set's anomalies (labels: their
defect types), selected on held-out generated anomalies only, tested on the real anomalies the generator never saw."""

from __future__ import annotations

import csv
import json
from functools import partial
from pathlib import Path

import pytest
import torch

from anomgen.data import layouts
from anomgen.data.synthetic import write_set

#: write_mvtec's defect folders, so that the generated types line up with the real ones
DEFECTS = ("broken", "crack")


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """An MVTec layout with 3 anomalies per type (a third, 1, trained the generator; 2 are test anomalies) and a
    synthetic set of 4 generated anomalies with masks per type, plus one normal."""
    root = tmp_path_factory.mktemp("defect-task")
    mvtec = layouts.write_mvtec(root / "mvtec", categories=("bottle",), n_train=4, n_test_good=2, defects=DEFECTS,
                                n_per_defect=3, size=32)
    gen = torch.Generator().manual_seed(0)
    samples = []
    for i in range(8):
        mask = torch.zeros(32, 32)
        mask[4 + i : 12 + i, 6:14] = 1.0
        samples.append({"image": torch.rand(3, 32, 32, generator=gen), "mask": mask, "label": 1,
                        "generator": "toy", "category": "bottle", "defect_type": DEFECTS[i % 2],
                        "sources": [f"{mvtec}/bottle/train/good/000.png"], "params": {}})
    samples.append({"image": torch.rand(3, 32, 32, generator=gen), "mask": None, "label": 0, "generator": "toy",
                    "category": "bottle", "defect_type": "good", "sources": [], "params": {}})
    pairs = write_set(root / "set", samples, {"generator": "toy"})
    return Path(mvtec), Path(pairs)


def _overrides(task) -> list[str]:
    mvtec, pairs = task
    return ["model=defect_classifier", "datamodule=defect_types", "debug=tiny", f"paths.mvtec_dir={mvtec}",
            f"datamodule.pairs_set={pairs}", "datamodule.val_fraction=0.25", "datamodule.dataset.image_size=32",
            "model.image_size=32", "callbacks=none", "trainer.enable_checkpointing=false"]


def test_classifier_trains_on_generated_selects_on_generated_and_tests_on_real(run_train, compose_config, task,
                                                                               tmp_path, one_thread):
    import hydra

    mvtec, pairs = task
    # the loaders: validation holds generated images only; the test, the real anomalies less the generator's third
    dm = hydra.utils.instantiate(compose_config("train", [*_overrides(task), "logger=none"]).datamodule)
    dm.setup("fit")
    assert dm.defect_types == list(DEFECTS)
    val = [r for batch in dm.val_dataloader() for r in zip(batch["image_path"], batch["source"], batch["label"])]
    assert len(val) == 2 and all(path.startswith(str(pairs)) and source == "toy" and label == 1
                                 for path, source, label in val)
    train = [p for batch in dm.train_dataloader() for p in batch["image_path"]]
    assert len(train) == 6 and not set(train) & {p for p, _, _ in val}
    test = [(p, t) for batch in dm.test_dataloader() for p, t in zip(batch["image_path"], batch["defect_type"])]
    assert sorted(test) == sorted((str(mvtec / "bottle" / "test" / d / f"{i:03d}.png"), d)
                                  for d in DEFECTS for i in (1, 2))  # 000.png of each type trained the generator
    assert dm.describe()["selected_on"].startswith("held-out generated")

    metrics, run_dir, _ = run_train([*_overrides(task), "logger=csv"], tmp_path / "run")
    assert {"test/defect_type_accuracy", "test/defect_type_accuracy/broken", "test/defect_type_accuracy/crack",
            "val/defect_type_accuracy", "train/loss"} <= set(metrics)
    assert 0.0 <= float(metrics["test/defect_type_accuracy"]) <= 1.0
    assert float(metrics["test/num_anomalies"]) == 4
    record = json.loads((run_dir / "run.json").read_text())
    saved = torch.load(record["outputs"]["classifier"], weights_only=True)
    info = saved["info"]
    assert info["defect_types"] == list(DEFECTS) and info["selected_on"].startswith("held-out generated")
    assert info["pretrained"] is None  # pretrained=tiny: random init
    # the selected epoch is the one of best accuracy on the held-out generated anomalies (ties: lower loss)
    rows = [r for r in csv.DictReader((run_dir / "csv" / "version_0" / "metrics.csv").open())
            if r.get("val/defect_type_accuracy")]
    assert len(rows) == 2
    best = max(rows, key=lambda r: (float(r["val/defect_type_accuracy"]), -float(r["val/loss"])))
    assert info["selected"]["epoch"] == int(best["epoch"])
    assert info["selected"]["val_defect_type_accuracy"] == pytest.approx(float(best["val/defect_type_accuracy"]))
    assert saved["state_dict"]["head.weight"].shape == (2, 512)
    written = json.loads((run_dir / "metrics.json").read_text())
    assert written["test/defect_type_accuracy"] == pytest.approx(float(metrics["test/defect_type_accuracy"]))


def test_defect_types_datamodule_refuses_test_selection_and_mismatched_sets(task, tmp_path):
    from anomgen.data import MVTecAD
    from anomgen.errors import ConfigError, DatasetError
    from datamodules import DefectTypeDataModule

    mvtec, pairs = task
    dataset = partial(MVTecAD, root=str(mvtec), category="bottle", image_size=32)
    with pytest.raises(ConfigError, match="never picked on the test split"):
        DefectTypeDataModule(dataset, protocol="defects", validation="test", pairs_set=str(pairs))
    # without a set it sets up (the task's splits) but will not load
    bare = DefectTypeDataModule(dataset, protocol="defects")
    bare.setup("fit")
    with pytest.raises(ConfigError, match="datamodule.pairs_set is required"):
        bare.train_dataloader()
    # a set that lacks one of the real defect types
    samples = [{"image": torch.rand(3, 32, 32), "mask": None, "label": 1, "generator": "toy", "category": "bottle",
                "defect_type": t, "sources": [], "params": {}} for t in ("broken", "scratch")]
    other = write_set(tmp_path / "other", samples, {"generator": "toy"})
    with pytest.raises(DatasetError, match=r"\['crack'\]"):
        DefectTypeDataModule(dataset, protocol="defects", pairs_set=str(other)).setup("fit")


def test_imagenet_weights_load_strictly_at_fit_time_and_missing_ones_say_how_to_supply(tmp_path, monkeypatch,
                                                                                      one_thread):
    from torchvision.models import resnet18

    from anomgen.errors import PretrainedNotFoundError
    from models.defect_classifier import DefectTypeClassifier

    torch.manual_seed(1)
    reference = resnet18(weights=None).state_dict()
    file = tmp_path / "resnet18.pth"
    torch.save(reference, file)
    model = DefectTypeClassifier(arch="resnet18", pretrained=str(file), image_size=32)  # nothing is read yet
    assert not torch.equal(model.net.conv1.weight, reference["conv1.weight"])
    model._load_imagenet()  # what setup("fit") does; the ImageNet head (fc) is left out
    assert all(torch.equal(model.net.state_dict()[k], v) for k, v in reference.items() if not k.startswith("fc."))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("ANOMGEN_PRETRAINED_DIR", raising=False)
    with pytest.raises(PretrainedNotFoundError, match="resnet34-b627a593.pth"):
        DefectTypeClassifier(pretrained="IMAGENET1K_V1")._load_imagenet()
