"""Prompt pools, vectorised prompt AUROCs and prompt-selection strategies, checked against independent computations."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from anomgen.metrics import MissingClassError, auroc
from anomgen.selection.prompts import PromptPool, prompt_aurocs, rank_aurocs, render_prompt_table, select_prompts

POOLS = Path(__file__).resolve().parents[2] / "anomgen" / "prompts"

# ----------------------------------------------------------------------------------------------------- pools

ANOMALY_PHRASES = {"cub": "some bird", "flowers": "some flower", "mvtec": "something", "mvtec_27": "something"}
#: the default prompt's anomalous text, written out
DEFAULT_ANOMALOUS = {"cub": "a photo of some bird.", "flowers": "a photo of some flower.",
                     "mvtec": "a photo of something.", "mvtec_27": "a photo of something."}


@pytest.mark.parametrize("pool_name, size", [("cub", 10), ("flowers", 10), ("mvtec", 10), ("mvtec_27", 27)])
def test_shipped_pools_load(pool_name, size):
    from anomgen.selection.prompts import shipped_pools

    assert shipped_pools() == ["cub", "flowers", "mvtec", "mvtec_27"]
    pool = PromptPool.load(pool_name)  # by name: package data
    assert PromptPool.load(POOLS / f"{pool_name}.yaml").templates == pool.templates  # or by path
    assert (pool.name, len(pool), pool.anomaly_word) == (pool_name, size, ANOMALY_PHRASES[pool_name])
    assert pool.default == "a photo of a {}."
    pairs = pool.pairs("metal nut")
    assert len(pairs) == size and len(set(pairs)) == size
    assert pairs[pool.default_index] == ("a photo of a metal nut.", DEFAULT_ANOMALOUS[pool_name])
    header = (POOLS / f"{pool_name}.yaml").read_text().split("\nname:")[0]
    assert "Provenance" in header and "NOT the paper's" in header and "anomgen's own" in header


CLASS_NAMES = ["metal nut", "apple", "orange dahlia", "black footed albatross", "hazelnut", "screw"]


@pytest.mark.parametrize("pool_name", ["cub", "flowers", "mvtec", "mvtec_27"])
def test_no_prompt_has_an_article_before_a_determiner_or_a_wrong_article(pool_name):
    import re

    pool = PromptPool.load(pool_name)
    for class_name in CLASS_NAMES:
        for normal, anomalous in pool.pairs(class_name):
            for prompt in (normal, anomalous):
                words = re.findall(r"[\w-]+", prompt.lower())
                for left, right in zip(words, words[1:]):
                    assert not (left in ("a", "an", "the") and right in ("a", "an", "the", "some", "something")), \
                        prompt
                    if left == "a":
                        assert right[0] not in "aeiou", prompt  # no "a apple", "a orange", "a origami"
                    if left == "an":
                        assert right[0] in "aeiou", prompt
            assert "{}" not in normal and "{}" not in anomalous


def test_fill_slot_written_out():
    from anomgen.selection.prompts import fill_slot

    cases = {
        ("a photo of a {}.", "apple"): "a photo of an apple.",
        ("a photo of a {}.", "metal nut"): "a photo of a metal nut.",
        ("a photo of a {}.", "some bird"): "a photo of some bird.",
        ("a photo of a {}.", "something"): "a photo of something.",
        ("a photo of a small {}.", "apple"): "a photo of a small apple.",
        ("a photo of a small {}.", "some bird"): "a photo of some small bird.",
        ("a photo of a hard to see {}.", "something"): "a photo of something hard to see.",
        ("a photo of the large {}.", "apple"): "a photo of the large apple.",
        ("a photo of the large {}.", "some flower"): "a photo of some large flower.",
        ("a origami {}.", "apple"): "an origami apple.",
        ("a {} in a video game.", "something"): "something in a video game.",
        ("A {} in a video game.", "unicorn"): "A unicorn in a video game.",
        ("a photo of an {}.", "hour glass"): "a photo of an hour glass.",
        ("a photo of {}.", "some bird"): "a photo of some bird.",  # no article of its own: as it is
        ("a photo of a {}, a type of bird.", "some bird"): "a photo of some bird, a type of bird.",
    }
    for (template, phrase), expected in cases.items():
        assert fill_slot(template, phrase) == expected, (template, phrase)
    with pytest.raises(ValueError, match="one"):
        fill_slot("a {} and a {}", "x")


def test_mvtec_27_is_built_from_open_clips_imagenet_templates():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

    photo_of_a = [f("{}") for f in OPENAI_IMAGENET_TEMPLATES if "photo of a " in f("{}")]
    simple = [f("{}") for f in SIMPLE_IMAGENET_TEMPLATES]
    assert list(PromptPool.load(POOLS / "mvtec_27.yaml").templates) == photo_of_a + simple


def write_pool(path: Path, templates, drop: str | None = None, **changes) -> Path:
    data = {"name": "test", "anomaly_word": "something", "default": 0, "templates": templates, **changes}
    data.pop(drop, None)
    path.write_text(json.dumps(data))  # JSON is YAML
    return path


@pytest.mark.parametrize("template, found", [("a photo of a thing.", "found 0"), ("a {} and a {}.", "found 2"),
                                             ("a photo of a {0}.", "found 1"), ("a photo of a {name}.", "found 1"),
                                             ("a photo of a {:>5}.", "found 1"), ("a photo of a {.", "not a valid")])
def test_template_without_exactly_one_slot_names_the_file_and_template(tmp_path, template, found):
    path = write_pool(tmp_path / "bad_pool.yaml", ["a photo of a {}.", template])
    with pytest.raises(ValueError, match="bad_pool.yaml") as err:
        PromptPool.load(path)
    assert "template 1" in str(err.value) and template in str(err.value) and found in str(err.value)


def test_pool_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(ValueError, match=r"p1\.yaml.*unknown: extra"):
        PromptPool.load(write_pool(tmp_path / "p1.yaml", ["a {}."], extra=1))
    with pytest.raises(ValueError, match=r"p2\.yaml.*not one of the templates"):
        PromptPool.load(write_pool(tmp_path / "p2.yaml", ["a {}."], default="the {}."))
    with pytest.raises(ValueError, match=r"p3\.yaml.*outside 0\.\.0"):
        PromptPool.load(write_pool(tmp_path / "p3.yaml", ["a {}."], default=1))
    with pytest.raises(ValueError, match=r"p4\.yaml.*template 1 'a \{\}\.' repeats template 0"):
        PromptPool.load(write_pool(tmp_path / "p4.yaml", ["a {}.", "a {}."]))
    with pytest.raises(ValueError, match=r"p5\.yaml.*missing: anomaly_word"):
        PromptPool.load(write_pool(tmp_path / "p5.yaml", ["a {}."], drop="anomaly_word"))
    with pytest.raises(FileNotFoundError, match="nowhere.yaml"):
        PromptPool.load(tmp_path / "nowhere.yaml")


def test_pool_from_mapping_takes_the_default_by_text():
    pool = PromptPool.from_mapping({"name": "x", "anomaly_word": "some bird", "default": "the {}.",
                                    "templates": ["a {}.", "the {}."]})
    assert pool.default_index == 1
    assert pool.pairs("wren") == [("a wren.", "some bird."), ("the wren.", "some bird.")]


# --------------------------------------------------------------------------------------------- prompt AUROCs


def test_rank_aurocs_match_auroc_with_ties():
    rng = np.random.default_rng(0)
    labels = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1, 0, 0])
    scores = torch.from_numpy(rng.integers(0, 4, size=(10, 5)).astype(np.float64))  # many ties
    scores[:, 4] = 2.0  # a constant column: AUROC 0.5
    got = rank_aurocs(scores, labels)
    for p in range(5):
        assert got[p].item() == pytest.approx(auroc(scores[:, p], labels), abs=1e-12)
        assert got[p].item() == pytest.approx(roc_auc_score(labels.numpy(), scores[:, p].numpy()), abs=1e-12)
    assert got[4].item() == 0.5
    with pytest.raises(MissingClassError, match="no anomalous sample"):
        rank_aurocs(scores, torch.zeros(10))


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_name):
    from anomgen.detectors.clip_zero_shot import CLIPZeroShot

    torch.manual_seed(0)
    return CLIPZeroShot(tiny_clip_name, pretrained=None)


def test_prompt_aurocs_equal_a_loop_of_auroc_per_prompt(tiny_clip):
    pool = PromptPool.load(POOLS / "cub.yaml")
    pairs = pool.pairs("cardinal")
    torch.manual_seed(3)
    images = torch.rand(16, 3, 32, 32)
    images[8:] = images[8:] * 0.5  # darker "anomalies", so that the AUROCs differ from 0.5
    labels = torch.tensor([0] * 8 + [1] * 8)
    features = tiny_clip.encode_images(images)
    got = prompt_aurocs(features, labels, tiny_clip.encode_texts([n for n, _ in pairs]),
                        tiny_clip.encode_texts([a for _, a in pairs]), tiny_clip.logit_scale)
    expected = [auroc(tiny_clip.anomaly_scores(features, normal, anomalous), labels) for normal, anomalous in pairs]
    assert got.shape == (10,) and got.dtype == torch.float64
    assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-12)
    assert len(set(expected)) > 1  # the prompts do rank the images differently


# ------------------------------------------------------------------------------------------------ selection

# Four tasks, four prompts. Real best prompts: a: 1 and 2 (tie), b: 2 and 3 (tie), c: 0, d: all four (tie).
REAL = {"a": [0.90, 0.95, 0.95, 0.80], "b": [0.70, 0.60, 0.75, 0.75], "c": [0.99, 0.50, 0.60, 0.70],
        "d": [0.80, 0.80, 0.80, 0.80]}
SYNTHETIC = {"a": [0.5, 0.6, 0.9, 0.7], "b": [0.8, 0.9, 0.1, 0.2], "c": [0.7, 0.7, 0.1, 0.1],
             "d": [0.1, 0.2, 0.3, 0.4]}
OTHER = {"a": [0.0, 0.0, 0.0, 1.0], "b": [1.0, 0.0, 0.0, 0.0], "c": [0.0, 0.0, 1.0, 0.0], "d": [0.0, 1.0, 0.0, 0.0]}
EXPECTED_CHOICES = {
    "synthetic": {"a": 2, "b": 1, "c": 0, "d": 3},  # c: synthetic tie of 0 and 1 goes to the lowest index
    "default": {"a": 0, "b": 0, "c": 0, "d": 0},
    "other_dataset": {"a": 3, "b": 0, "c": 2, "d": 1},
    "global_best": {"a": 0, "b": 0, "c": 0, "d": 0},  # prompt means: 0.8725, 0.7125, 0.775, 0.7625
    "best": {"a": 1, "b": 2, "c": 0, "d": 0},
    "worst": {"a": 3, "b": 1, "c": 1, "d": 0},
}


def figures(chosen: dict) -> tuple[float, float]:
    """(match rate, mean real AUROC) of one choice per task, written out plainly."""
    matches = sum(REAL[t][p] == max(REAL[t]) for t, p in chosen.items())
    return matches / len(chosen), sum(REAL[t][p] for t, p in chosen.items()) / len(chosen)


def test_select_prompts_choices_and_figures():
    results = select_prompts(REAL, SYNTHETIC, OTHER, default_index=0, seed=7)
    assert list(results) == ["synthetic", "random", "random_draw", "default", "other_dataset", "global_best",
                             "best", "worst"]
    for strategy, chosen in EXPECTED_CHOICES.items():
        assert results[strategy]["chosen"] == chosen, strategy
        match, mean_auroc = figures(chosen)
        assert results[strategy]["match_rate"] == pytest.approx(match), strategy
        assert results[strategy]["auroc"] == pytest.approx(mean_auroc), strategy
    assert results["synthetic"]["match_rate"] == pytest.approx(3 / 4)  # a (tie), c, d (all tie); not b
    assert results["worst"]["match_rate"] == pytest.approx(1 / 4)  # only d, where every prompt ties
    assert results["best"]["match_rate"] == 1.0
    as_tensors = [{t: torch.tensor(v, dtype=torch.float64) for t, v in table.items()}
                  for table in (REAL, SYNTHETIC, OTHER)]
    assert select_prompts(*as_tensors, default_index=0, seed=7) == results


def test_random_is_the_exact_expectation_over_uniform_choices():
    results = select_prompts(REAL, SYNTHETIC, None, default_index=0, seed=0)
    assert "other_dataset" not in results and results["random"]["chosen"] is None
    every_choice = [figures(dict(zip(REAL, combo))) for combo in itertools.product(range(4), repeat=len(REAL))]
    assert results["random"]["match_rate"] == pytest.approx(np.mean([m for m, _ in every_choice]), abs=1e-12)
    assert results["random"]["auroc"] == pytest.approx(np.mean([a for _, a in every_choice]), abs=1e-12)
    assert results["random"]["match_rate"] == pytest.approx((2 / 4 + 2 / 4 + 1 / 4 + 4 / 4) / 4)


def test_random_draw_is_seeded_and_scored_like_its_choices():
    draws = [select_prompts(REAL, SYNTHETIC, seed=s)["random_draw"] for s in range(8)]
    again = select_prompts(REAL, SYNTHETIC, seed=3)["random_draw"]
    assert again == draws[3] and again["seed"] == 3
    assert len({tuple(d["chosen"].values()) for d in draws}) > 1
    for draw in draws:
        assert set(draw["chosen"]) == set(REAL) and all(0 <= p < 4 for p in draw["chosen"].values())
        assert (draw["match_rate"], draw["auroc"]) == pytest.approx(figures(draw["chosen"]))


def test_select_prompts_rejects_mismatched_tables():
    with pytest.raises(ValueError, match=r"synthetic AUROCs must cover.*missing: \['d'\]"):
        select_prompts(REAL, {t: SYNTHETIC[t] for t in "abc"})
    with pytest.raises(ValueError, match="other_dataset AUROCs of task 'b' have 3 prompts, expected 4"):
        select_prompts(REAL, SYNTHETIC, {**OTHER, "b": [0.1, 0.2, 0.3]})
    with pytest.raises(ValueError, match="default_index 4 is outside 0..3"):
        select_prompts(REAL, SYNTHETIC, default_index=4)
    with pytest.raises(ValueError, match="task 'c' must be finite"):
        select_prompts(REAL, {**SYNTHETIC, "c": [0.1, float("nan"), 0.2, 0.3]})


def test_render_prompt_table():
    by_benchmark = {
        "one-vs-rest": select_prompts(REAL, SYNTHETIC, OTHER, seed=1),
        "one-vs-one average": select_prompts(REAL, SYNTHETIC, None, seed=1),
    }
    table = render_prompt_table(by_benchmark)
    lines = table.splitlines()
    assert lines[0] == ("| strategy | one-vs-rest match % | one-vs-rest AUROC | one-vs-one average match % | "
                        "one-vs-one average AUROC |")
    assert lines[1] == "|---|---|---|---|---|"
    rows = {line.split(" | ")[0].lstrip("| "): line.strip("| ").split(" | ")[1:] for line in lines[2:]}
    assert list(rows) == ["synthetic validation", "random (expected)", "random (one draw, seed 1)", "default prompt",
                          "other dataset as anomalies", "global best (oracle)", "best (oracle)", "worst (oracle)"]
    synthetic = by_benchmark["one-vs-rest"]["synthetic"]
    assert rows["synthetic validation"][:2] == [f"{100 * synthetic['match_rate']:.1f}", f"{synthetic['auroc']:.3f}"]
    assert rows["synthetic validation"][0] == "75.0"
    assert rows["other dataset as anomalies"][2:] == ["–", "–"]


# ------------------------------------------------------------------------------------------- over tasks


def test_prompt_class_names():
    from anomgen.selection.prompts import prompt_class_name

    assert prompt_class_name("001.Black_footed_Albatross") == "black footed albatross"
    assert prompt_class_name("metal_nut") == "metal nut"
    assert prompt_class_name("pink primrose") == "pink primrose"


def test_prompt_selection_over_tasks_equals_per_prompt_detectors(tiny_clip, tmp_path):
    """run_prompt_selection's real and synthetic AUROCs equal scoring each prompt pair as its own detector."""
    from types import SimpleNamespace

    from anomgen.selection.evaluation import image_metrics, score_dataset
    from anomgen.selection.features import FeatureCache
    from anomgen.selection.prompts import run_prompt_selection

    pool = PromptPool.from_mapping({"name": "t", "anomaly_word": "something", "default": 0,
                                    "templates": ["a photo of a {}.", "a {} object.", "{}"]})
    g = torch.Generator().manual_seed(5)
    images = torch.rand(12, 3, 32, 32, generator=g)
    images[6:] *= 0.5
    test = Records(images, [0] * 6 + [1] * 6, ["good"] * 6 + ["x"] * 3 + ["y"] * 3, "test")
    synthetic = Records(images.flip(0), [0] * 6 + [1] * 6, ["good"] * 6 + ["s"] * 6, "syn")
    task = SimpleNamespace(name="widget", test_set=test, validation_sets={"diffstyle": synthetic})
    out = run_prompt_selection(tiny_clip, pool, [task], FeatureCache(), "diffstyle")
    for p, (normal, anomalous) in enumerate(pool.pairs("widget")):
        tiny_clip.set_prompts(normal, anomalous)
        real, _ = image_metrics(*score_dataset(tiny_clip, test))
        syn, _ = image_metrics(*score_dataset(tiny_clip, synthetic))
        got = out["per_task"]["widget"]
        assert got["real"]["image_AUROC"][p] == pytest.approx(real["image_AUROC"], abs=1e-9)
        assert got["real"]["image_AUROC_one_vs_one_closest"][p] == pytest.approx(
            real["image_AUROC_one_vs_one_closest"], abs=1e-9)
        assert got["synthetic"][p] == pytest.approx(syn["image_AUROC"], abs=1e-9)
    assert set(out["results"]) == {"image_AUROC", "image_AUROC_one_vs_one_mean", "image_AUROC_one_vs_one_closest"}
    assert "synthetic validation" in out["table"]


class Records(torch.utils.data.Dataset):
    """Labelled records with ``entries`` (what the feature cache and the prompt tables read)."""

    def __init__(self, images: torch.Tensor, labels: list[int], defects: list[str], prefix: str) -> None:
        from anomgen.data.record import Entry

        self.images = images
        self.entries = [Entry(f"{prefix}/{i}", y, "widget", d) for i, (y, d) in enumerate(zip(labels, defects))]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict:
        from anomgen.data.record import make_record

        e = self.entries[i]
        return make_record(self.images[i], e.label, None, e.image_path, None, e.category, "real", e.defect_type)
