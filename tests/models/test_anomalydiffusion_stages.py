"""AnomalyDiffusion's stages on the tiny LDM: the pipeline runs every stage offline and exports image-mask pairs of
the category's defect types made from normal training images only, evaluated on a test split without the generator's
training anomalies; bad input is refused with a message naming it (a defect type too small for the split, a training
mask that vanishes on or covers the latent grid, files of another category, a mask model that gives up)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

TYPES = ["broken", "crack"]
ENCODER = {"channels": (8, 8, 16, 16), "head_channels": 16}
EMBEDDING_STAGE = ["~experiment", "model=anomalydiffusion_embedding", "trainer=steps", "datamodule=mvtec", "debug=tiny",
                   "callbacks=none", "logger=none", "datamodule.dataset.image_size=32",
                   "datamodule.anomaly_train_fraction=0.5", "datamodule.train_on=anomaly_train",
                   "datamodule.batch_size=2", "trainer.max_steps=1", "model.num_type_tokens=1",
                   "model.num_mask_tokens=1", "model.encoder={channels: [8, 8, 16, 16], head_channels: 16}"]
GENERATE_STAGE = ["~experiment", "model=anomalydiffusion", "datamodule=mvtec", "debug=tiny", "logger=none",
                  "datamodule.dataset.image_size=32", "model.num_per_type=1", "model.steps=2", "model.mask_steps=2"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny tensors on one thread (the root conftest's ``one_thread``): on a busy 2-core machine two threads per
    UNet pass cost many times more than one."""


def saved_files(folder: Path, category: str = "bottle") -> tuple[Path, Path]:
    """An embedding file and a mask file of the tiny LDM's width (random, as an untrained stage would leave them)."""
    from anomgen.generators.anomalydiffusion import AnomalyEmbedding, save_anomaly_embedding
    from anomgen.generators.anomalydiffusion_masks import MaskEmbedding, save_mask_embedding

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        embedding = AnomalyEmbedding(2, 32, 1, 1, init=torch.randn(32), resolution=32, encoder=ENCODER,
                                     type_names=TYPES)
        masks = MaskEmbedding(TYPES, 32, 2, init=torch.randn(2, 32))
    return (save_anomaly_embedding(folder / "embedding.safetensors", embedding, {"category": category}),
            save_mask_embedding(folder / "masks.safetensors", masks, {"category": category}))


def test_the_pipeline_runs_every_stage_offline_and_exports_pairs_with_masks(run_train, tmp_path):
    """``experiment=anomalydiffusion_mvtec debug=tiny``: the embedding and mask files of the category's two defect
    types, 2 pairs per type with non-empty masks, each made from a normal training image (no sample's source is a test
    image), and kNN scored on a test split that holds every good test image and only the anomalies the generator did
    not learn from, and the pairs' generation figures. The figures are plumbing (tiny random weights), not results."""
    from anomgen.data import MVTecAD
    from anomgen.data.synthetic import SyntheticSet, read_manifest
    from anomgen.generators.anomalydiffusion import load_anomaly_embedding
    from anomgen.generators.anomalydiffusion_masks import load_mask_embedding

    metrics, run_dir, _ = run_train(["experiment=anomalydiffusion_mvtec", "debug=tiny", "logger=none"],
                                    tmp_path / "ad")
    run_dir = Path(run_dir)
    outputs = json.loads((run_dir / "run.json").read_text())["outputs"]
    embedding = load_anomaly_embedding(outputs["embedding.embedding"], width=32)
    assert embedding.type_names == TYPES and embedding.info["category"] == "bottle"
    assert embedding.num_type_tokens == 2 and embedding.num_mask_tokens == 2  # debug=tiny's sizes reached the stage
    assert load_mask_embedding(outputs["masks.masks"]).type_names == TYPES

    set_dir = Path(outputs["generate.synthetic_set"])
    rows = read_manifest(set_dir)
    assert [r["defect_type"] for r in rows] == ["broken", "crack", "broken", "crack"]  # num_per_type 2, cycled
    assert {r["category"] for r in rows} == {"bottle"} and {r["label"] for r in rows} == {1}
    for row in rows:
        assert row["mask"] is not None, row["id"]
        assert (np.asarray(Image.open(set_dir / row["mask"])) > 0).any(), f"{row['id']}: empty mask"
        params = row["params"]
        assert params["defect_type"] == row["defect_type"] and set(params["seeds"]) == {"normal", "mask", "blend"}
        assert params["steps"] == 3 and params["aar"] == "off" and params["final_blend"] is True
    read = SyntheticSet(set_dir)
    assert all(read[i]["mask"].sum() > 0 for i in range(len(read)))

    info = json.loads((set_dir / "set.json").read_text())
    root = info["task"]["dataset_kwargs"]["root"]
    test_paths = {e.image_path for e in MVTecAD(root, category="bottle", split="test").entries}
    train_good = {e.image_path for e in MVTecAD(root, category="bottle", split="train").entries}
    sources = [s for r in rows for s in r["sources"]]
    assert sources and set(sources) <= train_good and not set(sources) & test_paths

    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    task = report["task"]
    assert task["num_anomaly_train"] == 2  # ⌊2 × 0.5⌋ per type at debug=tiny (the paper's third needs 3 per type)
    assert task["num_test"] == len(test_paths) - 2  # every good test image + the anomalies left for testing
    assert 0.0 <= metrics["evaluate/test/knn_pixels/image_AUROC"] <= 1.0
    assert metrics["evaluate/anomalydiffusion/knn_pixels/num_anomalies"] == 4  # the generated pairs, scored too
    # the pairs' Inception Score (2 splits of 2) and IC-LPIPS per defect type around that type's training anomaly
    generation = {k.split("/", 3)[-1]: v for k, v in metrics.items()
                  if k.startswith("evaluate/generation/anomalydiffusion/")}
    assert generation["num_generated"] == 4 and generation["inception_score"] >= 1.0
    assert set(generation) >= {"ic_lpips", "ic_lpips/broken", "ic_lpips/crack"}
    # the classifier stage: trained on the pairs, tested on the real anomalies left for testing (1 per type here)
    assert 0.0 <= metrics["classifier/test/defect_type_accuracy"] <= 1.0
    classifier = json.loads((run_dir / "classifier" / "run.json").read_text())["outputs"]
    assert Path(classifier["classifier"]).is_file()
    assert generation["ic_lpips"] == pytest.approx((generation["ic_lpips/broken"] + generation["ic_lpips/crack"]) / 2)


def test_a_defect_type_too_small_for_the_split_is_named(run_train, tmp_path):
    """The paper's third on the tiny layout (2 anomalies per type): the first stage stops naming the type."""
    with pytest.raises(Exception, match=r"defect type 'broken' has 2 anomalous image\(s\).*at least 3 images"):
        run_train(["experiment=anomalydiffusion_mvtec", "debug=tiny", "logger=none",
                   "anomalydiffusion.train_fraction=0.3333333333333333"], tmp_path / "few")


def test_training_masks_that_vanish_or_cover_the_latent_grid_are_named(run_train, tmp_path):
    from anomgen.data import layouts

    root = Path(layouts.write_mvtec(tmp_path / "mvtec"))
    mask_file = root / "bottle" / "ground_truth" / "crack" / "000_mask.png"  # in anomaly_train (the first by name)
    speck = np.zeros((32, 32), np.uint8)
    speck[7, 9] = 255  # one pixel: a quarter of a cell on the 16 × 16 latent grid
    Image.fromarray(speck).save(mask_file)
    with pytest.raises(ValueError, match=r"masks of samples \['.*crack/000_mask.png'\] vanish on the \(16, 16\)"):
        run_train([*EMBEDDING_STAGE, f"paths.mvtec_dir={root}"], tmp_path / "speck")
    Image.fromarray(np.full((32, 32), 255, np.uint8)).save(mask_file)
    with pytest.raises(ValueError, match=r"masks of samples \['.*crack/000_mask.png'\] cover the whole"):
        run_train([*EMBEDDING_STAGE, f"paths.mvtec_dir={root}"], tmp_path / "full")


def test_the_generation_stage_refuses_other_files_and_a_mask_model_that_gives_up(run_train, tmp_path):
    embedding, masks = saved_files(tmp_path / "cable", category="cable")
    with pytest.raises(ValueError, match=r"was learned on category 'cable'; the datamodule's is 'bottle'"):
        run_train([*GENERATE_STAGE, f"model.embedding={embedding}", f"model.masks={masks}"], tmp_path / "other")
    with pytest.raises(ValueError, match="needs model.embedding and model.masks"):
        run_train(GENERATE_STAGE, tmp_path / "none")
    embedding, masks = saved_files(tmp_path / "bottle")
    # a threshold no decoded image passes: every draw is an empty mask, and the stage stops after the allowed tries
    with pytest.raises(Exception, match=r"defect type 'broken': no acceptable mask in 2 tries \(rejected: 2 empty"):
        run_train([*GENERATE_STAGE, f"model.embedding={embedding}", f"model.masks={masks}", "model.mask_threshold=1.0",
                   "model.mask_max_tries=2"], tmp_path / "gives-up")


def test_generation_metrics_need_the_training_anomalies_and_named_sets():
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from evaluate import generation_figures

    cfg = OmegaConf.create({"generation_metrics": {"sets": ["other"]}, "seed": 0})
    with pytest.raises(ValueError, match="anomaly_train_fraction"):
        generation_figures(cfg, SimpleNamespace(anomaly_train=None), {"other": "x"})
    with pytest.raises(ValueError, match=r"names \['other'\], not among synthetic_sets \['anomalydiffusion'\]"):
        generation_figures(cfg, SimpleNamespace(anomaly_train=[0]), {"anomalydiffusion": "x"})


def test_the_generation_stage_makes_only_the_defect_types_asked_for(run_train, tmp_path):
    """``model.defect_types``: a subset of the files' types (the others get no pairs); a type the files do not hold
    is an error naming it and the types they hold."""
    from anomgen.data.synthetic import read_manifest

    embedding, masks = saved_files(tmp_path / "files")
    files = [f"model.embedding={embedding}", f"model.masks={masks}", "model.mask_threshold=0.3"]
    with pytest.raises(ValueError, match=r"model.defect_types \['scratch'\] are not in the embedding file .*"
                                         r"\['broken', 'crack'\]"):
        run_train([*GENERATE_STAGE, *files, "model.defect_types=[scratch]"], tmp_path / "unknown")
    _, run_dir, _ = run_train([*GENERATE_STAGE, *files, "model.defect_types=[crack]", "model.num_per_type=2"],
                              tmp_path / "crack")
    outputs = json.loads((Path(run_dir) / "run.json").read_text())["outputs"]
    rows = read_manifest(Path(outputs["synthetic_set"]))
    assert [r["defect_type"] for r in rows] == ["crack", "crack"]
