"""train.py and evaluate.py end to end: every experiment offline, the default job on real digits, the CLI contract."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from anomgen.data.synthetic import SyntheticSet, read_manifest
from anomgen.errors import PretrainedNotFoundError, SyntheticSetError

ROOT = Path(__file__).resolve().parent.parent
ALL_EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))


def _is_pipeline(name: str) -> bool:
    """The experiment, or a shared part it takes (``- /fitymi: small``), defines ``pipeline:``."""
    import re

    text = (ROOT / "configs" / "experiment" / f"{name}.yaml").read_text()
    parts = [ROOT / "configs" / group / f"{option}.yaml" for group, option in
             re.findall(r"^\s*- /(\w+): (\w+)\s*$", text, re.M)]
    return any("\npipeline:" in t for t in [text, *(p.read_text() for p in parts if p.is_file())])


PIPELINES = [e for e in ALL_EXPERIMENTS if _is_pipeline(e)]
EXPERIMENTS = [e for e in ALL_EXPERIMENTS if e not in PIPELINES]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_stage_experiment_runs_fast_dev_run(compose_config, tmp_path, experiment):
    from evaluate import evaluate
    from train import train

    overrides = [f"experiment={experiment}", "debug=tiny", "+trainer.fast_dev_run=true", "logger=csv"]
    cfg = compose_config("train", overrides, run_dir=tmp_path / "train")
    metrics, run_dir, is_zero = train(cfg)
    assert is_zero and (run_dir / "metrics.json").is_file()
    set_dir = Path(cfg.synthetic_set_dir)
    exported = SyntheticSet(set_dir)
    assert len(exported) == metrics["predict/num_exported"] > 0
    record = json.loads((run_dir / "run.json").read_text())
    assert record["complete"] and record["outputs"]["synthetic_set"] == str(set_dir.resolve())
    ecfg = compose_config("evaluate", overrides, run_dir=tmp_path / "evaluate")  # the set: the last run's output
    emetrics, erun = evaluate(ecfg)
    saved = json.loads((erun / "metrics.json").read_text())
    name = ecfg.detector.name
    assert 0.0 <= saved[f"test/{name}/image_AUROC"] <= 1.0
    assert 0.0 <= saved[f"synthetic/{name}/image_AUROC"] <= 1.0
    assert (erun / "report.md").read_text().startswith("# Evaluation")
    if cfg.get("quality"):  # the train callback scored the set's anomalies and kept the best as another output
        key = cfg.quality.key
        assert all(key in r["scores"] for r in read_manifest(set_dir) if r["label"] == 1)
        selected = Path(record["outputs"][f"synthetic_set_{key}_top"])
        assert selected == set_dir.with_name(f"{set_dir.name}_{key}_top").resolve()
        assert len(read_manifest(selected)) == math.ceil(len(exported) * cfg.quality.keep_fraction)
        assert 0.0 <= saved[f"synthetic_{key}_top/{name}/image_AUROC"] <= 1.0


# the FITYMI pipelines' tiny runs: one fast_dev_run batch per stage, 10 sampling steps of the score-SDE (a value of the
# sde stage's model only: the other stages do not get it)
FITYMI_TINY = ["debug=tiny", "+trainer.fast_dev_run=true", "logger=csv", "model.num_steps=10"]


@pytest.fixture(scope="module")
def fitymi_digits_run(tmp_path_factory, tiny_cache, compose_run):
    """One tiny run of the default job's pipeline (experiment=fitymi_digits), shared by the tests below."""
    from train import train

    root = tmp_path_factory.mktemp("fitymi_digits")
    cfg, overrides = compose_run("train", ["experiment=fitymi_digits", *FITYMI_TINY], root / "run", root / "logs",
                                 tiny_cache)
    metrics, run_dir, _ = train(cfg, overrides)
    return cfg, metrics, run_dir


#: pipelines run end to end by a test of their own (with more checks): not run a second time here
OWN_END_TO_END_TEST = {
    "fitymi_digits": "the shared fitymi_digits_run below",
    "adp_mvtec": "tests/models/test_adp_stages.py::test_adp_pipeline_runs_every_stage_offline",
    "localizer_mvtec": "tests/models/test_unet_localizer.py::test_localizer_experiment_end_to_end",
    "anomalydiffusion_mvtec": "tests/models/test_anomalydiffusion_stages.py::"
                              "test_the_pipeline_runs_every_stage_offline_and_exports_pairs_with_masks",
}


@pytest.mark.parametrize("experiment", [e for e in PIPELINES if e not in OWN_END_TO_END_TEST])
def test_every_pipeline_runs_fast_dev_run(compose_config, tmp_path, experiment):
    from train import train

    overrides = [f"experiment={experiment}", *FITYMI_TINY] if experiment.startswith("fitymi_") else \
        [f"experiment={experiment}", "debug=tiny", "+trainer.fast_dev_run=true", "logger=wandb"]  # W&B: plots, table
    cfg = compose_config("train", overrides, run_dir=tmp_path / "run")
    _check_pipeline_run(cfg, *train(cfg, compose_config.overrides)[:2])


def test_the_default_pipeline_runs_fast_dev_run(fitymi_digits_run):
    _check_pipeline_run(*fitymi_digits_run)


def _check_pipeline_run(cfg, metrics: dict, run_dir: Path) -> None:
    """Every stage ran in its own folder and recorded its outputs; the last stage (evaluate) scored."""
    recorded = json.loads((run_dir / "pipeline.json").read_text())
    stages = recorded["stages"]
    for name, folder in stages.items():
        assert json.loads((Path(folder) / "run.json").read_text())["complete"], name
    kept = [name for name, stage in cfg.pipeline.items() if stage is not None]  # a null stage is left out
    assert recorded["order"] == kept and recorded["order"][-1] == "evaluate"
    record = json.loads((run_dir / "run.json").read_text())
    assert record["complete"] and set(stages) <= {k.split(".")[0] for k in record["outputs"]}
    if "oe" in cfg.pipeline:  # FITYMI
        assert metrics["sde/predict/num_exported"] > 0
        assert Path(record["outputs"]["oe.backbone"]) == run_dir / "oe" / "backbone.pt"
        for name in ("knn_pixels", "backbone_without_oe", "backbone_with_oe"):
            assert 0.0 <= metrics[f"evaluate/test/{name}/image_AUROC"] <= 1.0
            assert 0.0 <= metrics[f"evaluate/synthetic/{name}/image_AUROC"] <= 1.0
    elif "cn" in cfg.pipeline:  # ADP: the concept files, then image AUROC of every detector
        for stage in ("ti", "cn", "ca"):
            assert Path(record["outputs"][f"{stage}.concept"]).is_file()
        for name in ("winclip_plus", "ti", "c_n", "c_a", "adp", "adp_l"):
            assert 0.0 <= metrics[f"evaluate/test/{name}/image_AUROC"] <= 1.0
    elif "localizer" in cfg.pipeline:  # the U-Net localizer: its weights file, then pixel and image metrics
        assert Path(record["outputs"]["localizer.checkpoint"]) == run_dir / "localizer" / "localizer.pt"
        for key in ("pixel_AUROC", "pixel_AP", "pixel_F1Max", "pixel_AUPRO", "image_AUROC", "image_AP"):
            assert 0.0 <= metrics[f"evaluate/test/unet_localizer/{key}"] <= 1.0
    elif "masks" in cfg.pipeline:  # AnomalyDiffusion: its two files, pairs with masks, kNN on the test split
        for stage in ("embedding", "masks"):
            assert Path(record["outputs"][f"{stage}.{stage}"]).is_file()
        rows = read_manifest(record["outputs"]["generate.synthetic_set"])
        assert rows and all(r["mask"] and r["label"] == 1 for r in rows)
        assert 0.0 <= metrics["evaluate/test/knn_pixels/image_AUROC"] <= 1.0
    else:
        sets = list(cfg.selection.sets)  # one foreach stage per set: a run per task, each with its set
        for name in sets:
            runs = record["outputs"][f"{name}.runs"]
            assert runs and all((Path(folder) / "synthetic_set" / "set.json").is_file() for folder in runs.values())
        _check_selection_run(run_dir / "evaluate", metrics, sets, prefix="evaluate/")


def _check_selection_run(run_dir: Path, saved: dict, sets: list[str], prefix: str = "") -> None:
    out = run_dir / "selection"
    assert saved[f"{prefix}selection/num_tasks"] >= 1
    assert (out / "selection.md").is_file() and json.loads((out / "selection.json").read_text())["tasks"]
    for name in sets:  # every set of every task: held-out normals + anomalies, and a grid of them
        assert 0.0 <= saved[f"{prefix}selection/{name}/Kall/image_AUROC/top1_rate"] <= 1.0
        assert (out / f"scatter_{name}_image_AUROC.png").is_file()
    if (out / "prompts.md").is_file():
        assert (out / "prompts.md").read_text().count("|") > 20
        assert 0.0 <= saved[f"{prefix}selection/prompts/image_AUROC/synthetic/auroc"] <= 1.0
    assert len(list(out.glob("grid_*.png"))) == len(sets)


def test_example_generator_on_real_digits(compose_config, tmp_path):
    """The bare groups (example generator on digits) export a set; evaluate.py finds it and reports AUROC."""
    from evaluate import evaluate
    from train import train

    cfg = compose_config("train", ["logger=csv"], run_dir=tmp_path / "train")
    metrics, run_dir, _ = train(cfg)
    exported = SyntheticSet(cfg.synthetic_set_dir)
    # one anomaly per support image: the training images of class "3" less the 10% held out
    assert len(exported) == metrics["predict/num_exported"] == exported.info["task"]["support_size"]
    assert {r["category"] for r in exported.rows} == {"3"}
    ecfg = compose_config("evaluate", ["logger=csv"], run_dir=tmp_path / "evaluate")  # synthetic set: the latest
    assert Path(ecfg.synthetic_sets.synthetic) == Path(cfg.synthetic_set_dir).resolve()
    emetrics, _ = evaluate(ecfg)
    test, synthetic = emetrics["test"]["knn_pixels"], emetrics["synthetic"]["knn_pixels"]
    # kNN on raw pixels is near the ceiling on digits (0.99 one-vs-rest); the noise patches are easier still
    assert test["image_AUROC"] > 0.97
    assert test["image_AUROC_one_vs_one_closest"] <= test["image_AUROC_one_vs_one_mean"]
    assert synthetic["num_anomalies"] == len(exported)
    assert synthetic["num_normals"] > 0


def test_export_refuses_to_overwrite_a_set_before_fitting(compose_config, tmp_path):
    from train import train

    set_dir = tmp_path / "the_set"
    overrides = ["logger=none", "debug=limit", f"synthetic_set_dir={set_dir}", "model=sde_nearnd"]
    train(compose_config("train", overrides, run_dir=tmp_path / "a"))
    before = read_manifest(set_dir)
    with pytest.raises(SyntheticSetError, match="already exists"):
        train(compose_config("train", overrides, run_dir=tmp_path / "b"))
    assert read_manifest(set_dir) == before
    assert not (tmp_path / "b" / "checkpoints").exists()  # refused before any training
    train(compose_config("train", [*overrides, "callbacks.synthetic_set_export.overwrite=true", "seed=1"],
                         run_dir=tmp_path / "c"))
    assert read_manifest(set_dir) != before  # another seed: other draws


def test_overwrite_of_a_folder_that_is_not_a_set_is_refused_before_fitting(compose_config, tmp_path):
    """The check before fitting is the merge's own: overwrite=true on a folder that is no set fails at once, not after
    training (the merge would refuse it)."""
    from train import train

    folder = tmp_path / "my_notes"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    overrides = ["logger=none", "debug=limit", f"synthetic_set_dir={folder}", "model=sde_nearnd",
                 "callbacks.synthetic_set_export.overwrite=true"]
    with pytest.raises(SyntheticSetError, match="my_notes exists and is not a synthetic set"):
        train(compose_config("train", overrides, run_dir=tmp_path / "a"))
    assert not (tmp_path / "a" / "checkpoints").exists()  # refused before any training
    assert (folder / "notes.txt").read_text() == "mine"


def _set_made_for(folder: Path, task: dict) -> Path:
    """A small synthetic set whose set.json says it was made for ``task``."""
    import torch

    from anomgen.data.synthetic import write_set

    samples = [{"image": torch.rand(3, 8, 8), "generator": "noise", "category": "x"} for _ in range(4)]
    return write_set(folder, samples, {"generator": "noise", "task": task})


def _as_last_train_run(log_dir: Path, run_dir: Path, set_dir: Path) -> None:
    """Record ``set_dir`` as the synthetic set of the last train.py run under ``log_dir``."""
    from anomgen import pipeline

    pipeline.write_run_record(run_dir, {"synthetic_set": str(set_dir)}, {"task": "train"})
    pipeline.point_latest_run(log_dir, run_dir)


@pytest.mark.parametrize("task, overrides, field, made_for", [
    ("digits", [], "normal_class", "5"),
    ("mvtec", ["datamodule=mvtec", "debug=tiny"], "category", "cable"),
])
def test_evaluate_refuses_the_last_runs_set_made_for_another_task(compose_config, tmp_path, task, overrides, field,
                                                                   made_for):
    """The default synthetic set (``${output:synthetic_set,null}``: whatever the last train.py run exported) made for
    another normal class or category is an error naming the folder, what it was made for and what the datamodule is;
    the same folder named on the command line is scored, with a warning."""
    import hydra

    from anomgen.errors import ConfigError
    from evaluate import evaluate

    base = ["logger=none", *overrides]
    datamodule = hydra.utils.instantiate(compose_config("evaluate", base, run_dir=tmp_path / "probe").datamodule)
    made = datamodule.describe()
    if field == "category":
        made["dataset_kwargs"] = {**made["dataset_kwargs"], "category": made_for}
    else:
        made[field] = made_for
    now = datamodule.normal_class if field == "normal_class" else datamodule.describe()["dataset_kwargs"]["category"]
    set_dir = _set_made_for(tmp_path / "other_task_set", made)
    _as_last_train_run(tmp_path / "logs", tmp_path / "train_run", set_dir)
    cfg = compose_config("evaluate", base, run_dir=tmp_path / "default")
    assert cfg.synthetic_sets.synthetic == str(set_dir)
    with pytest.raises(ConfigError) as err:
        evaluate(cfg)
    message = str(err.value)
    assert str(set_dir) in message and "synthetic_sets.synthetic" in message
    assert f"{field}={made_for!r}" in message and f"{field}={now!r}" in message
    assert not (tmp_path / "default" / "metrics.json").exists()
    assert f"differ in {field})" in message
    with pytest.warns(UserWarning, match=rf"was made for .*{field}={made_for!r}.*the datamodule is .*{field}={now!r}"):
        metrics, _ = evaluate(compose_config("evaluate", [*base, f"synthetic_sets.synthetic={set_dir}"],
                                             run_dir=tmp_path / "named"))
    assert metrics["synthetic"]["knn_pixels"]["num_anomalies"] == 4


@pytest.mark.parametrize("override, key", [
    ("trainer.max_epochs=abc", "trainer.max_epochs must be an integer >= -1 (-1: no limit) or null, got 'abc'"),
    ("datamodule.holdout_fraction=abc",
     "datamodule.holdout_fraction must be a number in [0.0, 1.0] or null, got 'abc'"),
    ("datamodule=folder", "datamodule.dataset.category is required for datamodule=folder"),
])
def test_train_and_evaluate_check_the_config_before_any_work(compose_config, run_train, tmp_path, override, key):
    """A value of the wrong type, or a ??? left, is one ConfigError naming the key, before anything is built:
    trainer.max_epochs=abc trained nothing or ended in a bare AssertionError, datamodule.holdout_fraction=abc in a raw
    TypeError, datamodule=folder without a category in "unknown category 'bottle'"."""
    from anomgen.errors import ConfigError
    from evaluate import evaluate

    common = ["logger=none", "debug=tiny", override]
    with pytest.raises(ConfigError) as err:
        run_train(common, tmp_path / "train")
    assert str(err.value).startswith(key)
    assert not (tmp_path / "train" / "checkpoints").exists() and not (tmp_path / "train" / "run.json").exists()
    if not override.startswith("trainer."):  # evaluate.py builds no trainer
        with pytest.raises(ConfigError) as err:
            evaluate(compose_config("evaluate", [*common, "synthetic_sets.synthetic=null"], run_dir=tmp_path / "e"))
        assert str(err.value).startswith(key)


@pytest.mark.parametrize("overrides, message", [
    (["model=sde_nearnd", "model.sampler=euler"], "model.sampler must be one of ('pc', 'euler_maruyama'), got 'euler'"),
    (["model=vit_oe", "model.head=mlp"], "model.head must be one of ('binary', 'regression'), got 'mlp'"),
    (["model=sde_nearnd", "callbacks=fid", "callbacks.fid_early_stopping.refine_every_n_steps=10",
      "callbacks.fid_early_stopping.refine_factor=0.5"],
     "callbacks.fid_early_stopping.refine_factor is a multiple of the target"),
])
def test_a_bad_model_or_callback_setting_is_one_error_line(run_train, tmp_path, monkeypatch, capsys, overrides,
                                                           message):
    """A setting that a model's or a callback's constructor refuses is a ConfigError that names its key, so the entry
    point prints one `error:` line instead of a traceback (these were plain ValueErrors)."""
    from anomgen.runtime import TRACEBACK_ENV, report_errors

    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(SystemExit) as stopped:
        with report_errors():
            run_train(["~experiment", "logger=none", "debug=tiny", *overrides], tmp_path / "run")
    lines = capsys.readouterr().err.strip().splitlines()
    assert stopped.value.code == 1 and len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_evaluate_rejects_an_incomplete_set(compose_config, tmp_path):
    from evaluate import evaluate
    from train import train

    set_dir = tmp_path / "the_set"
    train(compose_config("train", ["logger=none", "debug=limit", f"synthetic_set_dir={set_dir}"],
                         run_dir=tmp_path / "t"))
    (set_dir / "images" / "000000.png").unlink()
    with pytest.raises(SyntheticSetError, match="000000.png"):
        evaluate(compose_config("evaluate", ["logger=none", f"synthetic_sets.synthetic={set_dir}"],
                                run_dir=tmp_path / "e"))


def test_a_run_searches_its_config_s_pretrained_dir(compose_config, tmp_path, monkeypatch):
    """paths.pretrained_dir is searched for weights during a run, without $ANOMGEN_PRETRAINED_DIR: a detector whose
    backbone is named by file name alone is found there."""
    from anomgen.encoders.vit import build_vit, save_backbone
    from anomgen.runtime import own_error
    from evaluate import evaluate

    monkeypatch.delenv("ANOMGEN_PRETRAINED_DIR", raising=False)
    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "my_weights"
    save_backbone(build_vit("vit_small", 16, patch_size=4, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=32),
                  weights / "tiny_backbone.pt")
    mine = ("+detectors.mine={_target_:anomgen.detectors.KNNDetector,k:1,"
            "extractor:{_target_:anomgen.encoders.vit.load_backbone,path:tiny_backbone.pt}}")
    overrides = ["logger=none", "synthetic_sets.synthetic=null", mine]
    with pytest.raises(Exception) as err:  # not in the default folder, <root>/pretrained (Hydra wraps the error)
        evaluate(compose_config("evaluate", overrides, run_dir=tmp_path / "a"))
    missing = own_error(err.value)
    assert isinstance(missing, PretrainedNotFoundError)
    assert str(ROOT / "pretrained" / "tiny_backbone.pt") in str(missing)
    metrics, _ = evaluate(compose_config("evaluate", [*overrides, f"paths.pretrained_dir={weights}"],
                                         run_dir=tmp_path / "b"))
    assert 0.0 <= metrics["test"]["mine"]["image_AUROC"] <= 1.0


WINCLIP_MVTEC = ["datamodule=mvtec", "debug=tiny", "detector=winclip_plus", "datamodule.k_shot=2", "logger=csv"]


def test_evaluate_writes_pixel_metrics_of_winclip_plus_on_mvtec(compose_config, tmp_path):
    """`python evaluate.py '~experiment' datamodule=mvtec debug=tiny detector=winclip_plus datamodule.k_shot=2`: the
    tiny MVTec layout has masks, so WinCLIP+ (maps from the same pass as its scores) gets pixel metrics, equal to
    sklearn / the MVTec AUPRO reference on the maps of the same detector run again here."""
    import hydra
    import lightning as L
    import numpy as np
    import torch
    from pyaupro import auc_compute
    from pyaupro._reference import compute_pro
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    from anomgen.metrics import auroc, average_precision
    from evaluate import evaluate

    cfg = compose_config("evaluate", WINCLIP_MVTEC, run_dir=tmp_path / "e")
    _, run_dir = evaluate(cfg)
    saved = json.loads((run_dir / "metrics.json").read_text())
    prefix = "test/winclip_plus/"
    keys = ("pixel_AUROC", "pixel_AP", "pixel_F1Max", "pixel_F1Max_threshold", "pixel_AUPRO")
    assert all(0.0 <= saved[prefix + k] <= 1.0 for k in keys) and 0.0 <= saved[prefix + "image_AUROC"] <= 1.0
    pixel = json.loads((run_dir / "report.json").read_text())["detectors"]["winclip_plus"]["test_pixel_metrics"]
    assert pixel["mode"] == "binned" and pixel["score_range"] == [0.0, 1.0] and pixel["num_masks"] == 4
    report = (run_dir / "report.md").read_text()
    assert "| pixel_AUPRO |" in report and "Pixel metrics of `winclip_plus` (test)" in report

    # the same detector (same seed, same order of construction as evaluate), its maps of the test split
    L.seed_everything(cfg.seed, workers=True)
    datamodule = hydra.utils.instantiate(cfg.datamodule)
    datamodule.setup("test")
    detector = hydra.utils.instantiate(cfg.detector).fit(datamodule.support_dataloader())
    scores, maps = detector.predict(datamodule.test_dataloader())
    masks = torch.stack([r["mask"] for r in datamodule.test_set])
    labels = torch.tensor([r["label"] for r in datamodule.test_set])
    assert maps.shape == masks.shape and masks.sum() > 0
    assert saved[prefix + "image_AUROC"] == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12)
    # evaluate's figures are binned (K = 10,000 over WinCLIP's [0, 1]): the same as the binned functions on these maps
    binned = {"num_thresholds": cfg.pixel_metrics.num_thresholds, "score_range": (0.0, 1.0)}
    assert saved[prefix + "pixel_AUROC"] == pytest.approx(auroc(maps, masks, **binned), abs=1e-12)
    assert saved[prefix + "pixel_AP"] == pytest.approx(average_precision(maps, masks, **binned), abs=1e-12)
    # ... and within binning's 1e-3 of independent exact computations
    y, s = masks.flatten().numpy().astype(int), maps.flatten().double().numpy()
    precision, recall, _ = precision_recall_curve(y, s)
    fpr, pro = compute_pro(list(maps.double().numpy()), list(masks.numpy().astype(np.int32)))
    expected = {"pixel_AUROC": roc_auc_score(y, s), "pixel_AP": average_precision_score(y, s),
                "pixel_F1Max": float(np.max(2 * precision * recall / np.maximum(precision + recall, 1e-12))),
                "pixel_AUPRO": float(auc_compute(torch.from_numpy(fpr).double(), torch.from_numpy(pro).double(),
                                                 limit=0.3))}
    for key, value in expected.items():
        assert saved[prefix + key] == pytest.approx(value, abs=1e-3), key


def test_evaluate_skips_pixel_metrics_for_a_detector_without_maps(compose_config, tmp_path):
    """kNN on raw pixels has no maps: on MVTec (a test split with masks) it gets the image keys only, as before."""
    from evaluate import evaluate

    cfg = compose_config("evaluate", ["datamodule=mvtec", "debug=tiny", "detector=knn_pixels", "logger=none"],
                         run_dir=tmp_path / "e")
    metrics, run_dir = evaluate(cfg)
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert set(metrics["test"]["knn_pixels"]) == {
        "image_AUROC", "image_AP", "image_F1Max", "image_F1Max_threshold", "image_AUROC_one_vs_one_mean",
        "image_AUROC_one_vs_one_closest", "closest_out_class"}
    assert not [k for k in saved if "pixel_" in k]
    report = json.loads((run_dir / "report.json").read_text())
    assert "test_pixel_metrics" not in report["detectors"]["knn_pixels"]
    text = (run_dir / "report.md").read_text()
    assert "pixel_" not in text and "Pixel metrics" not in text


def test_evaluate_says_pixel_metrics_are_undefined_when_no_mask_has_an_anomalous_pixel(compose_config, tmp_path):
    """The tiny MVTec layout with every mask file blanked: WinCLIP's pixel metrics are null in metrics.json, with the
    reason, and "undefined" in report.md; its image metrics are unchanged."""
    import numpy as np
    from PIL import Image

    from evaluate import evaluate

    layout = tmp_path / "mvtec"
    shutil.copytree(compose_config("evaluate", WINCLIP_MVTEC).paths.mvtec_dir, layout)
    for mask in layout.glob("*/ground_truth/*/*_mask.png"):
        Image.fromarray(np.zeros_like(np.asarray(Image.open(mask)))).save(mask)
    cfg = compose_config("evaluate", ["datamodule=mvtec", "debug=tiny", "detector=winclip", "logger=none",
                                      f"paths.mvtec_dir={layout}"], run_dir=tmp_path / "e")
    with pytest.warns(UserWarning, match="no anomalous pixel"):
        _, run_dir = evaluate(cfg)
    saved = json.loads((run_dir / "metrics.json").read_text())
    prefix = "test/winclip/"
    assert all(saved[prefix + k] is None for k in ("pixel_AUROC", "pixel_AP", "pixel_F1Max", "pixel_AUPRO"))
    assert "no anomalous pixel (mask 1)" in saved[prefix + "pixel_undefined"]
    assert 0.0 <= saved[prefix + "image_AUROC"] <= 1.0
    report = (run_dir / "report.md").read_text()
    assert "| pixel_AUROC | undefined |" in report and "**Undefined**: no anomalous pixel" in report


def test_evaluate_report_and_table_show_pixel_metrics_and_when_they_are_undefined():
    from evaluate import log_detector_table, render_report

    image = {"image_AUROC": 0.9, "image_AUROC_one_vs_one_mean": 0.9, "image_AUROC_one_vs_one_closest": 0.8}
    undefined = "no anomalous pixel (mask 1) in the 6 test masks (4 from mask files): pixel_AUROC ... are undefined"
    metrics = {"test": {"knn": dict(image), "winclip": {**image, "pixel_AUROC": float("nan"), "pixel_AP": float("nan"),
                                                        "pixel_F1Max": float("nan"), "pixel_AUPRO": float("nan"),
                                                        "pixel_undefined": undefined}}}
    pixel = {"mode": "binned", "num_thresholds": 10000, "score_range": [0.0, 1.0], "fpr_limit": 0.3, "num_images": 6,
             "num_masks": 4, "num_pixels": 1000, "num_anomalous_pixels": 0, "maps_resized_from": [7, 7]}
    report = {"task": {"dataset": "MVTecAD", "protocol": "defects", "normal_class": None, "support_size": 2},
              "synthetic_sets": {}, "metrics": metrics,
              "detectors": {"knn": {"test_per_out_class": {}},
                            "winclip": {"test_per_out_class": {}, "test_pixel_metrics": pixel}}}
    text = render_report(report)
    assert "| pixel_AUPRO | – | undefined |" in text and f"**Undefined**: {undefined}." in text
    assert "maps of (7, 7) resized bilinearly" in text and "| pixel_undefined |" not in text

    class Logger:
        def log_table(self, key, columns, data):
            self.table = (key, columns, data)

    logger = Logger()
    log_detector_table(logger, metrics)
    key, columns, data = logger.table
    assert columns[-4:] == ["test/pixel_AUROC", "test/pixel_AP", "test/pixel_F1Max", "test/pixel_AUPRO"]
    assert data[0][-4:] == [None] * 4 and data[1][-4:] == [None] * 4  # no maps; undefined (NaN) as empty cells
    log_detector_table(logger, {"test": {"knn": dict(image)}})
    assert logger.table[1] == ["detector", "test/image_AUROC", "test/image_AUROC_one_vs_one_mean",
                               "test/image_AUROC_one_vs_one_closest"]


def _run(script: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, str(ROOT / script), *overrides], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_cli_default_job_prints_the_run_directory_last(tmp_path):
    """`python train.py` (the FITYMI pipeline, here tiny and one batch per stage), then `python evaluate.py`
    scoring the same detectors on that run's outputs: the same figures, each prints its run folder last."""
    paths = [f"paths.log_dir={tmp_path / 'logs'}", f"paths.cache_dir={tmp_path / 'cache'}", "debug=tiny"]
    train = _run("train.py", *paths, "+trainer.fast_dev_run=true", "logger=wandb", "model.num_steps=10", cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    run_dir = Path(train.stdout.strip().splitlines()[-1])
    assert run_dir.is_dir() and run_dir.parent.parent == tmp_path / "logs" / "train"
    saved = json.loads((run_dir / "metrics.json").read_text())
    for name in ("knn_pixels", "backbone_without_oe", "backbone_with_oe"):
        assert 0.0 <= saved[f"evaluate/test/{name}/image_AUROC"] <= 1.0
    assert (run_dir / "oe" / "backbone.pt").is_file()
    assert "evaluate/test/knn_pixels/image_AUROC" in train.stdout
    tables = list(run_dir.glob("evaluate/wandb/offline-run-*/files/media/table/summary/*.table.json"))
    assert tables, "the detector comparison must reach W&B as a table"
    table = json.loads(tables[0].read_text())
    assert table["columns"][0] == "detector" and len(table["data"]) == 3
    evaluate = _run("evaluate.py", *paths, "logger=wandb", cwd=tmp_path)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    eval_dir = Path(evaluate.stdout.strip().splitlines()[-1])
    report = json.loads((eval_dir / "report.json").read_text())
    assert set(report["detectors"]) == {"knn_pixels", "backbone_without_oe", "backbone_with_oe"}
    assert report["synthetic_sets"]["synthetic"] == str(run_dir / "sde" / "synthetic_set")
    again = json.loads((eval_dir / "metrics.json").read_text())
    assert {k: v for k, v in again.items()} == {k.removeprefix("evaluate/"): v for k, v in saved.items()
                                                if k.startswith("evaluate/")}
    assert list((eval_dir / "wandb").glob("offline-run-*")), "W&B must log offline into the run directory"


def test_cli_folder_without_a_category_is_one_error_line(tmp_path):
    out = _run("train.py", f"paths.log_dir={tmp_path}", "~experiment", "datamodule=folder", "logger=none", cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1].startswith(
        "error: datamodule.dataset.category is required for datamodule=folder")


def test_cli_unknown_key_fails_with_its_name(tmp_path):
    out = _run("train.py", f"paths.log_dir={tmp_path}", "model.no_such_key=3", cwd=tmp_path)
    assert out.returncode != 0
    assert "no_such_key" in out.stderr


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_cli_bad_dataset_path_is_one_error_line_and_exit_code_1(tmp_path, script):
    """The project's own error (here a DatasetError: no MVTec AD folder) ends the run with one `error:` line on
    stderr naming the folder, not a traceback (ANOMGEN_TRACEBACK=1 brings it back: tests/test_runtime.py)."""
    missing = tmp_path / "no_mvtec_here"
    out = _run(script, f"paths.log_dir={tmp_path / 'logs'}", "logger=none", "experiment=noise_patch_mvtec",
               f"paths.mvtec_dir={missing}", cwd=tmp_path)
    assert out.returncode == 1, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: mvtec_ad: folder not found: {missing}"], out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "Error executing job" not in out.stderr


def test_resume_from_a_checkpoint_continues_training(compose_config, tmp_path):
    """``ckpt_path=<run>/checkpoints/last.ckpt`` resumes fitting where it stopped (epochs and global step)."""
    import torch

    from train import train

    common = ["experiment=sde_digits", "debug=limit", "logger=none", "callbacks=default", "generate=false"]
    train(compose_config("train", common, run_dir=tmp_path / "a"))
    first = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)
    train(compose_config("train", [*common, f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}",
                                   "trainer.max_epochs=3"], run_dir=tmp_path / "b"))
    second = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["epoch"] == 1 and second["epoch"] == 2
    assert second["global_step"] == first["global_step"] * 3 // 2  # one more epoch of the same length


FOREACH = ["logger=none", "pipeline={sets: {foreach: {key: datamodule.normal_class, values: ['3', '5']}, overrides: "
           "['model=noise_set', 'model.n_style=2', 'model.n_content=2', 'model.n_held_out=3']}}"]


def test_a_foreach_stage_runs_per_value_and_resumes_per_value(run_train, tmp_path):
    """One run per value in ``<stage>/<value>`` with the value's override; ``VALUE.KEY`` outputs and ``runs`` recorded;
    killed between two values, a rerun keeps the finished value's run and runs the other."""
    run = tmp_path / "run"
    metrics, _, _ = run_train(FOREACH, run)
    outputs = json.loads((run / "sets" / "run.json").read_text())["outputs"]
    assert outputs["runs"] == {"3": str(run / "sets" / "3"), "5": str(run / "sets" / "5")}
    for value in ("3", "5"):
        made = SyntheticSet(outputs[f"{value}.synthetic_set"])
        assert made.info["task"]["normal_class"] == value and len(made) == 2 * 2 + 3
        assert metrics[f"sets/{value}/predict/num_exported"] == 7
    assert json.loads((run / "run.json").read_text())["outputs"]["sets.runs"] == outputs["runs"]
    kept = {p: p.stat().st_mtime_ns for p in (run / "sets" / "3").rglob("*") if p.is_file()}
    # killed while exporting the set of "5": no record, no set (the export renames a set only when whole)
    shutil.rmtree(run / "sets" / "5")
    (run / "sets" / "run.json").unlink()
    (run / "run.json").unlink()
    again, _, _ = run_train(FOREACH, run)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # "3" did not run again
    assert json.loads((run / "sets" / "5" / "run.json").read_text())["complete"]
    assert json.loads((run / "sets" / "run.json").read_text())["outputs"] == outputs
    assert again == metrics


def test_foreach_values_all_are_the_tasks_of_the_dataset(compose_config):
    from anomgen.pipeline import foreach_spec, task_values

    digits = compose_config("train", [])
    assert task_values(digits.datamodule) == [str(c) for c in range(10)]
    mvtec = compose_config("train", ["experiment=noise_patch_mvtec", "debug=tiny"])
    assert task_values(mvtec.datamodule) == ["bottle"]  # the defects protocol: the categories
    assert foreach_spec({"key": "datamodule.normal_class", "values": "all"}, "s") == ("datamodule.normal_class", "all")
    for bad in ({"key": "k"}, {"key": "k", "values": []}, {"key": "k", "values": "Dog"},
                {"key": "k", "values": [1, 1]}):
        with pytest.raises(ValueError, match="foreach"):
            foreach_spec(bad, "s")


def test_a_stage_names_an_earlier_output_and_runs_alone(fitymi_digits_run, run_train, tmp_path):
    """OE on a set made before (``oe.set=<folder> '~pipeline.sde'``): no SDE stage runs, the OE backbone records
    which set it saw; a missing set fails naming the folder."""
    import torch

    made = fitymi_digits_run[2] / "sde" / "synthetic_set"
    again = ["experiment=fitymi_digits", *FITYMI_TINY, f"oe.set={made}", "~pipeline.sde"]
    metrics, run_dir, _ = run_train([*again, f"synthetic_sets.synthetic={made}"], tmp_path / "again")
    assert not (run_dir / "sde").exists() and "sde/predict/num_exported" not in metrics
    info = torch.load(run_dir / "oe" / "backbone.pt", weights_only=True)["info"]
    assert info["outlier_exposure_set"] == str(made)
    assert 0.0 <= metrics["evaluate/test/backbone_with_oe/image_AUROC"] <= 1.0
    with pytest.raises(SyntheticSetError, match="no_such_set"):
        run_train([*again[:-2], f"oe.set={tmp_path / 'no_such_set'}", "~pipeline.sde"], tmp_path / "missing")


def test_a_cached_stage_made_with_other_settings_is_refused(fitymi_digits_run, run_train, tmp_path):
    """The backbone stage is cached across runs by dataset and epochs; one made from another number of images is not
    silently reused."""
    with pytest.raises(ValueError, match=r"stage 'backbone'.*other settings.*max_images"):
        run_train(["experiment=fitymi_digits", *FITYMI_TINY, "pretrain.max_images=32"], tmp_path / "second")


def test_a_pipeline_waits_for_another_that_is_making_a_shared_stage(fitymi_digits_run, run_train, tmp_path, caplog):
    """Two pipelines started at once both found the cached backbone missing and trained it into the same folder. The
    folder is now locked while a run makes it: here the test holds the lock (as the first run would), the second
    pipeline waits, then finds the stage finished and reuses it untouched."""
    import logging
    import threading
    import time

    from anomgen.pipeline import PIPELINE_RECORD, stage_lock

    backbone = Path(json.loads((fitymi_digits_run[2] / PIPELINE_RECORD).read_text())["stages"]["backbone"])
    made = (backbone / "run.json").stat().st_mtime_ns
    only_backbone = ["experiment=fitymi_digits", *FITYMI_TINY, "~pipeline.sde", "~pipeline.oe", "~pipeline.evaluate"]
    ended: list = []

    def second_pipeline() -> None:
        try:
            ended.append(run_train(only_backbone, tmp_path / "second"))
        except BaseException as err:  # noqa: BLE001 - handed to the test's thread
            ended.append(err)

    caplog.set_level(logging.INFO, logger="anomgen")
    with stage_lock(backbone) as lock_file:
        assert lock_file == backbone.with_name(backbone.name + ".lock")
        worker = threading.Thread(target=second_pipeline)
        worker.start()
        deadline = time.monotonic() + 120
        while worker.is_alive() and "another run is making" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        assert worker.is_alive() and not ended, "the second pipeline must wait while the stage is being made"
        assert f"another run is making {backbone}; waiting for it" in caplog.text
    worker.join(timeout=300)
    assert not worker.is_alive() and len(ended) == 1 and not isinstance(ended[0], BaseException), ended
    assert (backbone / "run.json").stat().st_mtime_ns == made  # reused, not made a second time
    assert "finished before" in caplog.text


def test_a_pipeline_names_its_stages_logger_runs_and_groups_them(fitymi_digits_run, run_train, compose_config,
                                                                 tmp_path, monkeypatch):
    """Every W&B run was named after the entry point ("train"): the stages of a pipeline could not be told apart or
    gathered. A stage's run is now <experiment>/<stage>, in one group per pipeline run; a run outside a pipeline keeps
    its task name, and foreach values add theirs."""
    import train as entry

    seen: dict = {}

    def spy(stage_cfg, stage):  # records the composed stage instead of running it (the SDE stage is the last here)
        seen[str(stage_cfg.paths.output_dir)] = (stage_cfg.logger.wandb.name, stage_cfg.logger.wandb.group)

    monkeypatch.setattr(entry, "run_entry", spy)
    _, run_dir, _ = run_train(["experiment=fitymi_digits", *FITYMI_TINY, "logger=wandb", "~pipeline.oe",
                               "~pipeline.evaluate"], tmp_path / "named")
    # the backbone is the shared cached one (skipped: no run); the SDE stage is composed to run
    assert seen == {str(run_dir / "sde"): ("fitymi_digits/sde", f"fitymi_digits/{run_dir.name}")}
    alone = compose_config("train", ["model=sde_nearnd", "logger=wandb"])
    assert (alone.logger.wandb.name, alone.logger.wandb.group) == ("train", None)
    stage = {"overrides": ["model=diffstyle"], "run_name": "selection_animals/diffstyle/Dog", "run_group": "g/1"}
    composed = entry.compose_stage(stage, ["experiment=selection_animals"], tmp_path, tmp_path / "diffstyle" / "Dog")
    assert composed.logger.wandb.name == "selection_animals/diffstyle/Dog" and composed.logger.wandb.group == "g/1"


def test_a_pipeline_override_reaches_only_the_stages_that_have_its_key(compose_config, tmp_path):
    """``model.sde.kind=...`` is the SDE stage's; the pretraining and OE stages (other models) do not get it, while
    group choices (``debug=tiny``) and keys every stage has reach them all."""
    from omegaconf import OmegaConf

    from anomgen.pipeline import applicable_overrides

    groups = {p.name for p in (ROOT / "configs").iterdir() if p.is_dir()}
    oe = compose_config("train", ["experiment=fitymi_digits", "model=vit_oe"])
    keep, skip = applicable_overrides(["debug=tiny", "model.sde.kind=vp", "datamodule.normal_class=5",
                                       "+trainer.fast_dev_run=true", "hydra.run.dir=x", "oe.set=/a/set",
                                       "~pipeline.sde"], oe, groups)
    # oe.set is an experiment key whose value (an ${output:...}) cannot be resolved here: it still applies
    assert keep == ["debug=tiny", "datamodule.normal_class=5", "+trainer.fast_dev_run=true", "oe.set=/a/set",
                    "~pipeline.sde"]
    assert skip == ["model.sde.kind=vp", "hydra.run.dir=x"]
    assert OmegaConf.select(oe, "model.sde", default=None) is None


def test_group_choices_are_told_from_values_by_the_override_grammar():
    """The one helper that says which overrides choose a group (the base every stage is composed from)."""
    from anomgen.pipeline import group_choices

    groups = {p.name for p in (ROOT / "configs").iterdir() if p.is_dir()}
    overrides = ["debug=tiny", "+datamodule@foo=mvtec", "~experiment", "model.sde.kind=vp", "datamodule.normal_class=5",
                 "hydra.run.dir=x", "+logger=csv", "experimentx=1"]
    assert group_choices(overrides, groups) == ["debug=tiny", "+datamodule@foo=mvtec", "~experiment",
                                                "+logger=csv"]


def test_pipeline_resumes_after_being_killed_between_stages(fitymi_digits_run, tiny_cache, compose_run):
    """A rerun in the same folder skips the finished stages (their files untouched) and runs the rest; the figures
    equal those of the uninterrupted run (each stage seeds itself). (Last of the tests on the shared run: it kills
    and resumes that run.)"""
    from train import train

    _, first, run = fitymi_digits_run
    kept = {p: p.stat().st_mtime_ns for p in (run / "sde").rglob("*") if p.is_file()}
    backbone = Path(json.loads((run / "pipeline.json").read_text())["stages"]["backbone"]) / "backbone.pt"
    backbone_mtime = backbone.stat().st_mtime_ns
    # killed during the OE stage: its record never written, a half-written file left, nothing after it
    shutil.rmtree(run / "evaluate")
    (run / "oe" / "run.json").unlink()
    (run / "run.json").unlink()
    (run / "oe" / "backbone.pt").write_bytes(b"half")
    cfg, overrides = compose_run("train", ["experiment=fitymi_digits", *FITYMI_TINY], run, run.parent / "logs",
                                 tiny_cache)
    again, _, _ = train(cfg, overrides)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept  # the SDE stage did not run again
    assert backbone.stat().st_mtime_ns == backbone_mtime
    assert json.loads((run / "oe" / "run.json").read_text())["complete"]
    figures = {k: v for k, v in first.items() if k.startswith("evaluate/")}
    assert {k: again[k] for k in figures} == figures


def test_the_documented_stronger_diffstyle_edit_composes_and_reaches_only_the_diffstyle_stage(compose_config):
    """``experiment=selection_animals model.gamma=1.0 model.mix=slerp ...`` (docs/results/selection.md) composes at the
    root, and of the stages' models only DiffStyle's has the keys (the noise and digits sets' models do not)."""
    from anomgen.pipeline import applicable_overrides

    groups = {p.name for p in (ROOT / "configs").iterdir() if p.is_dir()}
    strong = ["model.gamma=1.0", "model.mix=slerp", "model.t_edit=200", "model.t_boost=100"]
    root = compose_config("train", ["experiment=selection_animals", *strong])
    assert (root.model.gamma, root.model.mix, root.model.t_edit, root.model.t_boost) == (1.0, "slerp", 200, 100)
    diffstyle = compose_config("train", ["experiment=selection_animals", "model=diffstyle"])
    assert applicable_overrides(strong, diffstyle, groups) == (strong, [])
    for model in ("noise_set", "dataset_set"):
        stage = compose_config("train", ["experiment=selection_animals", f"model={model}"])
        assert applicable_overrides(strong, stage, groups) == ([], strong)
