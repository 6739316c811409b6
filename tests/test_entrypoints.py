"""train.py and evaluate.py end to end: every experiment offline, the default job on real digits, the CLI contract."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from anomgen.data.synthetic import SyntheticSet, read_manifest
from anomgen.errors import SyntheticSetError

ROOT = Path(__file__).resolve().parent.parent
ALL_EXPERIMENTS = sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml"))
# synthetic-validation experiments are evaluate.py-only (they build their validation sets themselves)
SELECTION_EXPERIMENTS = [e for e in ALL_EXPERIMENTS if "selection" in e]
EXPERIMENTS = [e for e in ALL_EXPERIMENTS if e not in SELECTION_EXPERIMENTS]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_fast_dev_run(compose_config, tmp_path, experiment):
    from evaluate import evaluate
    from train import train

    overrides = [f"experiment={experiment}", "debug=tiny", "+trainer.fast_dev_run=true", "logger=csv"]
    cfg = compose_config("train", overrides, run_dir=tmp_path / "train")
    metrics, run_dir, is_zero = train(cfg)
    assert is_zero and (run_dir / "metrics.json").is_file()
    set_dir = Path(cfg.synthetic_set_dir)
    exported = SyntheticSet(set_dir)
    assert len(exported) == metrics["predict/num_exported"] > 0
    ecfg = compose_config("evaluate", [*overrides, f"synthetic_set={set_dir}"], run_dir=tmp_path / "evaluate")
    emetrics, erun = evaluate(ecfg)
    saved = json.loads((erun / "metrics.json").read_text())
    assert 0.0 <= saved["test/image_AUROC"] <= 1.0
    assert 0.0 <= saved["synthetic/image_AUROC"] <= 1.0
    assert (erun / "report.md").read_text().startswith("# Evaluation")
    if ecfg.get("quality"):  # the set's anomalies were scored and the best kept
        key = ecfg.quality.key
        assert all(key in r["scores"] for r in read_manifest(set_dir) if r["label"] == 1)
        assert 0.0 <= saved[f"synthetic_{key}_top/image_AUROC"] <= 1.0
        selected = Path(cfg.synthetic_set_dir).with_name(f"{set_dir.name}_{key}_top")  # made by the train callback
        assert len(read_manifest(selected)) == math.ceil(len(exported) * ecfg.quality.keep_fraction)


@pytest.mark.parametrize("experiment", SELECTION_EXPERIMENTS)
def test_every_selection_experiment_runs_tiny(compose_config, tmp_path, experiment):
    from evaluate import evaluate

    logger = "wandb" if experiment == "animals_selection" else "csv"  # W&B (offline): plots, grids and a table
    cfg = compose_config("evaluate", [f"experiment={experiment}", "debug=tiny", f"logger={logger}"],
                         run_dir=tmp_path / "e")
    _, run_dir = evaluate(cfg)
    saved = json.loads((run_dir / "metrics.json").read_text())
    sets = list(cfg.selection.validation_sets)
    assert saved["selection/num_tasks"] >= 1
    out = run_dir / "selection"
    assert (out / "selection.md").is_file() and json.loads((out / "selection.json").read_text())["tasks"]
    for name in sets:  # every set of every task: held-out normals + anomalies, and a grid of them
        assert 0.0 <= saved[f"selection/{name}/Kall/image_AUROC/top1_rate"] <= 1.0
        assert (out / f"scatter_{name}_image_AUROC.png").is_file()
    if cfg.selection.get("prompts"):
        assert (out / "prompts.md").read_text().count("|") > 20
        assert 0.0 <= saved["selection/prompts/image_AUROC/synthetic/auroc"] <= 1.0
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
    ecfg = compose_config("evaluate", ["logger=csv"], run_dir=tmp_path / "evaluate")  # synthetic_set: the latest
    assert Path(ecfg.synthetic_set) == Path(cfg.synthetic_set_dir)
    emetrics, _ = evaluate(ecfg)
    # kNN on raw pixels is near the ceiling on digits (0.99 one-vs-rest); the noise patches are easier still
    assert emetrics["test"]["image_AUROC"] > 0.97
    assert emetrics["test"]["image_AUROC_one_vs_one_closest"] <= emetrics["test"]["image_AUROC_one_vs_one_mean"]
    assert emetrics["synthetic"]["num_anomalies"] == len(exported)
    assert emetrics["synthetic"]["num_normals"] > 0


def test_export_refuses_to_overwrite_a_set(compose_config, tmp_path):
    from train import train

    set_dir = tmp_path / "the_set"
    overrides = ["logger=none", "debug=limit", f"synthetic_set_dir={set_dir}"]
    train(compose_config("train", overrides, run_dir=tmp_path / "a"))
    before = read_manifest(set_dir)
    with pytest.raises(SyntheticSetError, match="already exists"):
        train(compose_config("train", overrides, run_dir=tmp_path / "b"))
    assert read_manifest(set_dir) == before
    train(compose_config("train", [*overrides, "callbacks.synthetic_set_export.overwrite=true", "seed=1"],
                         run_dir=tmp_path / "c"))
    assert read_manifest(set_dir) != before  # another seed: other draws


def test_evaluate_rejects_an_incomplete_set(compose_config, tmp_path):
    from evaluate import evaluate
    from train import train

    set_dir = tmp_path / "the_set"
    train(compose_config("train", ["logger=none", "debug=limit", f"synthetic_set_dir={set_dir}"],
                         run_dir=tmp_path / "t"))
    (set_dir / "images" / "000000.png").unlink()
    with pytest.raises(SyntheticSetError, match="000000.png"):
        evaluate(compose_config("evaluate", ["logger=none", f"synthetic_set={set_dir}"], run_dir=tmp_path / "e"))


def _run(script: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, str(ROOT / script), *overrides], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_default_job_prints_the_run_directory_last(tmp_path):
    """`python train.py` (the FITYMI default job, here tiny and one batch per stage), then `python evaluate.py`
    re-scoring that run's detector; each prints its run folder last."""
    paths = [f"paths.log_dir={tmp_path / 'logs'}", f"paths.cache_dir={tmp_path / 'cache'}", "debug=tiny"]
    train = _run("train.py", *paths, "+trainer.fast_dev_run=true", "logger=wandb", cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    run_dir = Path(train.stdout.strip().splitlines()[-1])
    assert run_dir.is_dir() and run_dir.parent.parent == tmp_path / "logs" / "train"
    saved = json.loads((run_dir / "metrics.json").read_text())
    for name in ("knn_pixels", "backbone_without_oe", "backbone_with_oe"):
        assert 0.0 <= saved[f"summary/{name}/image_AUROC"] <= 1.0
    assert (run_dir / "oe" / "backbone.pt").is_file()
    assert "summary/knn_pixels/image_AUROC" in train.stdout
    tables = list(run_dir.glob("wandb/offline-run-*/files/media/table/summary/*.table.json"))
    assert tables, "the detector comparison must reach W&B as a table"
    table = json.loads(tables[0].read_text())
    assert table["columns"][0] == "detector" and len(table["data"]) == 3
    evaluate = _run("evaluate.py", *paths, "logger=wandb", cwd=tmp_path)
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    eval_dir = Path(evaluate.stdout.strip().splitlines()[-1])
    report = json.loads((eval_dir / "report.json").read_text())
    assert report["detector"] == "knn_backbone"
    assert report["synthetic_set"] == str(run_dir / "synthetic_set")
    assert list((eval_dir / "wandb").glob("offline-run-*")), "W&B must log offline into the run directory"


def test_cli_unknown_key_fails_with_its_name(tmp_path):
    out = _run("train.py", f"paths.log_dir={tmp_path}", "model.no_such_key=3", cwd=tmp_path)
    assert out.returncode != 0
    assert "no_such_key" in out.stderr


def test_resume_from_a_checkpoint_continues_training(compose_config, tmp_path):
    """``ckpt_path=<run>/checkpoints/last.ckpt`` resumes fitting where it stopped (epochs and global step)."""
    import torch

    from train import train

    common = ["experiment=digits_sde", "debug=limit", "logger=none", "callbacks=default", "generate=false"]
    train(compose_config("train", common, run_dir=tmp_path / "a"))
    first = torch.load(tmp_path / "a" / "checkpoints" / "last.ckpt", weights_only=False)
    train(compose_config("train", [*common, f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'last.ckpt'}",
                                   "trainer.max_epochs=3"], run_dir=tmp_path / "b"))
    second = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=False)
    assert first["epoch"] == 1 and second["epoch"] == 2
    assert second["global_step"] == first["global_step"] * 3 // 2  # one more epoch of the same length


def test_outlier_exposure_on_a_set_made_before(compose_config, tmp_path):
    """``outlier_exposure_set=<dir>`` runs only the OE stage and the detector comparison on that set: the generative
    model is neither fitted nor run, and the OE backbone records which set it saw. Bad sets fail naming the folder."""
    import torch

    from train import train

    common = ["experiment=digits_nearnd", "debug=tiny", "+trainer.fast_dev_run=true", "logger=csv",
              f"paths.cache_dir={tmp_path / 'cache'}"]
    train(compose_config("train", common, run_dir=tmp_path / "first"))
    made = tmp_path / "first" / "synthetic_set"
    metrics, run_dir, _ = train(compose_config("train", [*common, f"outlier_exposure_set={made}"],
                                               run_dir=tmp_path / "again"))
    assert "predict/num_exported" not in metrics and "train/loss" not in metrics  # no SDE fit, no export
    assert not (run_dir / "synthetic_set").exists() and not (run_dir / "checkpoints").exists()
    info = torch.load(run_dir / "oe" / "backbone.pt", weights_only=False)["info"]
    assert info["outlier_exposure_set"] == str(made)
    assert 0.0 <= metrics["summary/backbone_with_oe/image_AUROC"] <= 1.0

    with pytest.raises(SyntheticSetError, match="no_such_set"):
        train(compose_config("train", [*common, f"outlier_exposure_set={tmp_path / 'no_such_set'}"],
                             run_dir=tmp_path / "missing"))
    with pytest.raises(ValueError, match="outlier_exposure: null"):
        train(compose_config("train", [*common, f"outlier_exposure_set={made}", "outlier_exposure=null"],
                             run_dir=tmp_path / "no_stage"))
