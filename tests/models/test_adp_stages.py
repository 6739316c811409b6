"""ADP's stages on the tiny stack: a concept stage learns what its objective asks (checked through the classifier
rebuilt independently), the pipeline runs every stage offline and scores ADP, ADP_l and WinCLIP+, and bad input is
refused with a message naming it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CONCEPT = ["~experiment", "model=adp_concept", "trainer=steps", "datamodule=mvtec", "debug=tiny", "callbacks=none",
           "datamodule.k_shot=2", "datamodule.validation=none", "datamodule.train_repeats=8",
           "trainer.limit_train_batches=1.0", "trainer.max_epochs=-1", "trainer.max_steps=12", "model.lr=0.05",
           "model.alpha=20.0", "datamodule.dataset.image_size=32"]


def _tiny_clip():
    from anomgen.encoders.clip_text import TINY_OPEN_CLIP_CONFIG, TINY_OPEN_CLIP_NAME, load_open_clip

    return load_open_clip(TINY_OPEN_CLIP_NAME, None, TINY_OPEN_CLIP_CONFIG)


def _p_normal(clip, placeholder: str, vectors: torch.Tensor, images: torch.Tensor, tau: float = 0.01) -> torch.Tensor:
    """P_CLIP(S_n(c) | x) of ``images`` for a concept, through a freshly built classifier (not the stage's)."""
    from anomgen.detectors import adp
    from anomgen.encoders.clip import embed_images
    from anomgen.encoders.clip_text import ConceptTextEncoder

    text = ConceptTextEncoder(clip, {placeholder: vectors})
    with torch.no_grad():
        states = adp.averaged_state_embeddings(text.encode, placeholder)
        return adp.state_probabilities(embed_images(clip, images), states, tau)[:, 0]


def _shots(compose_config, overrides):
    import hydra

    cfg = compose_config("train", overrides)
    datamodule = hydra.utils.instantiate(cfg.datamodule)
    datamodule.setup("fit")
    return torch.stack([datamodule.support[i]["image"] for i in range(len(datamodule.support))])


@pytest.fixture(scope="module")
def object_row():
    """The initial vector of c_n: the word "object"'s row of the shared token table."""
    from anomgen.encoders.clip_text import clip_tokenizer

    (row,) = clip_tokenizer()("object", add_special_tokens=False).input_ids
    return _tiny_clip().token_embedding.weight[row].detach().clone()[None]


def test_the_normal_concept_stage_makes_the_shots_flawless(run_train, compose_config, tmp_path, object_row):
    """c_n (Eq. 3): a few steps of TI + α·P_CLIP raise P(S_n(c) | shots) above that of the initial word; the file is
    the concept in diffusers' format, written only at the end."""
    from anomgen.encoders.clip_text import load_concepts

    metrics, run_dir, _ = run_train(CONCEPT, tmp_path / "cn")
    record = json.loads((Path(run_dir) / "run.json").read_text())
    concepts = load_concepts(record["outputs"]["concept"], width=32)
    assert list(concepts) == ["<adp-n>"] and concepts["<adp-n>"].shape == (1, 32)
    assert metrics["train/inversion_loss"] > 0 and metrics["train/clip_normal_term"] < 0

    shots = _shots(compose_config, CONCEPT)
    clip = _tiny_clip()
    before = _p_normal(clip, "<adp-n>", object_row, shots)
    after = _p_normal(clip, "<adp-n>", concepts["<adp-n>"], shots)
    assert (after - before).min() > 0.05, (before, after)

    # alpha = 0 is plain textual inversion: the CLIP term does not move the concept
    plain, plain_dir, _ = run_train([*CONCEPT, "model.alpha=0.0"], tmp_path / "ti")
    ti = load_concepts(json.loads((Path(plain_dir) / "run.json").read_text())["outputs"]["concept"])["<adp-n>"]
    assert plain["train/clip_normal_term"] == 0
    assert (_p_normal(clip, "<adp-n>", ti, shots) - before).abs().max() < (after - before).min()


def test_the_anomaly_concept_stage_pushes_pseudo_anomalies_away(run_train, compose_config, tmp_path):
    """c_a (Eq. 4), started from c_n's file: the gap P(S_n | shots) − P(S_n | pseudo-anomalies) widens."""
    from anomgen.data.generation import GeneratedBatch
    from anomgen.data.synthetic import SyntheticSet, write_set
    from anomgen.encoders.clip_text import load_concepts

    _, cn_dir, _ = run_train(CONCEPT, tmp_path / "cn")
    c_n_file = json.loads((Path(cn_dir) / "run.json").read_text())["outputs"]["concept"]
    pseudo = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    write_set(tmp_path / "pseudo", GeneratedBatch(
        index=torch.arange(6), image=pseudo, mask=None, label=torch.ones(6, dtype=torch.long), generator="sdedit",
        category=["bottle"] * 6, defect_type=["sdedit"] * 6, sources=[[f"/s/{i}.png"] for i in range(6)],
        params=[{}] * 6), {"generator": "sdedit"})
    overrides = [*CONCEPT, "model.phase=anomaly", "model.placeholder='<adp-a>'", f"model.init_concept={c_n_file}",
                 f"model.pseudo_anomalies={tmp_path / 'pseudo'}", "model.gamma=0.0"]
    metrics, run_dir, _ = run_train(overrides, tmp_path / "ca")
    c_a = load_concepts(json.loads((Path(run_dir) / "run.json").read_text())["outputs"]["concept"])["<adp-a>"]
    assert metrics["train/clip_anomaly_term"] >= 0
    read = SyntheticSet(tmp_path / "pseudo", image_size=(32, 32), labels=(1,))
    images = torch.stack([read[i]["image"] for i in range(len(read))])
    shots = _shots(compose_config, CONCEPT)
    clip = _tiny_clip()

    def gap(placeholder, vectors):
        return float(_p_normal(clip, placeholder, vectors, shots).mean()
                     - _p_normal(clip, placeholder, vectors, images).mean())

    assert gap("<adp-a>", c_a) > gap("<adp-n>", load_concepts(c_n_file)["<adp-n>"]) + 0.05


def test_adp_pipeline_runs_every_stage_offline(run_train, tmp_path):
    """``experiment=adp_mvtec debug=tiny``: the concept files of TI, c_n and c_a, two SDEdit sets (the second prompted
    with the learned c_a), and image AUROC of WinCLIP+, the ablation, ADP and ADP_l. The figures are plumbing (tiny
    random weights), not results."""
    from anomgen.data.synthetic import read_manifest
    from anomgen.encoders.clip_text import load_concepts

    metrics, run_dir, _ = run_train(["experiment=adp_mvtec", "debug=tiny"], tmp_path / "adp")
    run_dir = Path(run_dir)
    outputs = json.loads((run_dir / "run.json").read_text())["outputs"]
    for stage, placeholder in (("ti", "<adp-ti>"), ("cn", "<adp-n>"), ("ca", "<adp-a>")):
        assert list(load_concepts(outputs[f"{stage}.concept"])) == [placeholder]
    prompts = [r["params"]["prompt"] for r in read_manifest(outputs["pseudo_ca.synthetic_set"])]
    assert prompts == ["a photo of a damaged <adp-a>", "a photo of a <adp-a> with damage"] * 2
    assert [r["params"]["prompt"] for r in read_manifest(outputs["pseudo.synthetic_set"])][:2] == \
        ["a photo with damage", "a photo of an object with damage"]
    for detector in ("winclip_plus", "ti", "c_n", "c_a", "adp", "adp_l"):
        assert 0.0 <= metrics[f"evaluate/test/{detector}/image_AUROC"] <= 1.0
    report = json.loads((run_dir / "evaluate" / "report.json").read_text())
    assert report["task"]["k_shot"] == 2


def test_adp_bad_input_is_named(run_train, tmp_path):
    """K larger than the normal training images, and a placeholder that is already a word of the vocabulary."""
    with pytest.raises(Exception, match=r"K=500 normal images, the dataset has \d+"):
        run_train(["experiment=adp_mvtec", "debug=tiny", "adp.k_shot=500"], tmp_path / "k")
    with pytest.raises(Exception, match=r"'object' is already a token of the tokenizer's vocabulary"):
        run_train([*CONCEPT, "model.placeholder=object"], tmp_path / "word")
