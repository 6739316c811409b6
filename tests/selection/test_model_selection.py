"""Model selection by synthetic validation (anomgen.selection.model_selection): real and synthetic AUROCs against
brute-force kNN + scikit-learn, rank agreement against scipy, and a selection that finds the informative
candidate."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau, spearmanr
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import ConcatDataset

from anomgen.data.base import ArrayRecordDataset
from anomgen.data.tasks import TaskView
from anomgen.encoders.raw import raw_pixels
from anomgen.errors import DatasetError
from anomgen.selection.features import FeatureCache
from anomgen.selection.model_selection import (
    REAL_KEYS,
    Candidate,
    SelectionTask,
    candidates_from_config,
    k_lowest_auroc,
    rank_agreement,
    score_task,
    select_models,
    summarize,
)

CLASSES = ["support", "test-normal", "far", "near", "synthetic"]


class LeftHalf(nn.Module):
    """Sees only the left half of the image: misses the anomalies whose patch lies on the right."""

    def forward(self, images):
        return images[..., :4].flatten(1)


class Noise(nn.Module):
    """Features that ignore the image (a fixed random stream): an uninformative candidate."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def forward(self, images):
        return torch.randn(len(images), 8, generator=self.generator)


def _task(name: str, seed: int, n_support=40, n_held=10, n_test=20, n_far=12, n_near=12, n_syn=12):
    """Grey-ish 8×8 noise images as normals; anomalies carry a bright 3×3 patch at a random place (strong "far",
    weak "near" in the test split; medium "synthetic" for validation)."""
    rng = np.random.default_rng(seed)
    counts = [n_support, n_test, n_far, n_near, n_syn]
    images = 0.5 + 0.08 * rng.normal(size=(sum(counts), 8, 8, 3))
    classes = np.repeat(np.arange(5), counts)
    for i in np.flatnonzero(classes >= 2):
        r, c = rng.integers(0, 6, size=2)
        images[i, r : r + 3, c : c + 3] += {2: 0.4, 3: 0.2, 4: 0.3}[int(classes[i])]
    base = ArrayRecordDataset(np.clip(np.rint(images * 255), 0, 255).astype(np.uint8), classes, CLASSES, name,
                              range(len(classes)))
    idx = {c: [int(i) for i in np.flatnonzero(classes == k)] for k, c in enumerate(CLASSES)}

    def view(indices, label, defect):
        return TaskView(base, indices, [label] * len(indices), [defect] * len(indices))

    support = view(idx["support"], 0, "good")
    held, rest = idx["support"][:n_held], idx["support"][n_held:]
    test_idx = idx["test-normal"] + idx["far"] + idx["near"]
    test = TaskView(base, test_idx, [0] * n_test + [1] * (n_far + n_near),
                    ["good"] * n_test + ["far"] * n_far + ["near"] * n_near)
    validation = ConcatDataset([view(held, 0, "good"), view(idx["synthetic"], 1, "synthetic")])
    return SelectionTask(name, support, view(rest, 0, "good"), test, {"patch": validation})


def _images(dataset) -> np.ndarray:
    return np.stack([dataset[i]["image"].numpy() for i in range(len(dataset))]).astype(np.float64)


def _brute_scores(bank: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    d = np.sqrt(((queries[:, None, :] - bank[None, :, :]) ** 2).sum(-1))
    return np.sort(d, axis=1)[:, :k].sum(1)


def _labels(dataset):
    records = [dataset[i] for i in range(len(dataset))]
    return np.array([r["label"] for r in records]), [r["defect_type"] for r in records]


def _extractors() -> dict[str, nn.Module]:
    return {"rgb": raw_pixels(grayscale=False), "left": LeftHalf(), "noise": Noise()}


def test_real_and_synthetic_aurocs_equal_brute_force_knn_and_sklearn():
    task = _task("t0", seed=0)
    candidates = [Candidate("rgb-k3", "rgb"), Candidate("rgb-k1-pca", "rgb", k=1, reducer="pca:5")]
    result = score_task(task, candidates, _extractors(), FeatureCache(), k_values=(3, 5, 100, None))
    assert result["sizes"] == {"bank": 40, "synthetic_bank": 30, "test": {"normal": 20, "anomalous": 24},
                               "validation": {"patch": {"normal": 10, "anomalous": 12}}}
    bank, sbank = _images(task.bank).reshape(40, -1), _images(task.synthetic_bank).reshape(30, -1)
    test, val = _images(task.test_set).reshape(44, -1), _images(task.validation_sets["patch"]).reshape(22, -1)
    test_y, test_defects = _labels(task.test_set)
    val_y, _ = _labels(task.validation_sets["patch"])

    for name, project, k in (("rgb-k3", None, 3), ("rgb-k1-pca", 5, 1)):
        def scores(b, q, project=project, k=k):
            if project is not None:  # the reducer is fitted on the bank; distances ignore the components' signs
                pca = PCA(n_components=project).fit(b)
                b, q = pca.transform(b), pca.transform(q)
            return _brute_scores(b, q, k)

        got = result["candidates"][name]
        s = scores(bank, test)
        per_class = {d: roc_auc_score(test_y[(test_y == 0) | (np.array(test_defects) == d)],
                                      s[(test_y == 0) | (np.array(test_defects) == d)]) for d in ("far", "near")}
        assert got["real"]["image_AUROC"] == pytest.approx(roc_auc_score(test_y, s), abs=1e-9)
        assert got["real"]["per_out_class"] == pytest.approx(per_class, abs=1e-9)
        assert got["real"]["image_AUROC_one_vs_one_mean"] == pytest.approx(np.mean(list(per_class.values())))
        assert got["real"]["image_AUROC_one_vs_one_closest"] == pytest.approx(min(per_class.values()))
        assert got["real"]["closest_out_class"] == min(per_class, key=per_class.get)

        v = scores(sbank, val)
        normals, anomalies = v[val_y == 0], np.sort(v[val_y == 1])
        for label, kk in (("3", 3), ("5", 5), ("100", 12), ("all", 12)):
            kept = np.concatenate([normals, anomalies[:kk]])
            expected = roc_auc_score(np.r_[np.zeros(len(normals)), np.ones(kk)], kept)
            assert got["synthetic"]["patch"][label] == pytest.approx(expected, abs=1e-9)
        assert got["synthetic"]["patch"]["3"] <= got["synthetic"]["patch"]["all"]


def test_k_lowest_auroc_keeps_the_hardest_anomalies():
    rng = np.random.default_rng(3)
    scores = np.round(rng.normal(size=40), 1)  # ties included
    labels = (rng.random(40) < 0.4).astype(int)
    anomalies = np.flatnonzero(labels == 1)
    for k in (1, 3, 7, len(anomalies)):
        keep = np.r_[np.flatnonzero(labels == 0), anomalies[np.argsort(scores[anomalies], kind="stable")[:k]]]
        expected = roc_auc_score(labels[keep], scores[keep])
        assert k_lowest_auroc(torch.from_numpy(scores), torch.from_numpy(labels), k) == pytest.approx(expected)
    full = roc_auc_score(labels, scores)
    assert k_lowest_auroc(torch.from_numpy(scores), torch.from_numpy(labels), None) == pytest.approx(full)
    assert k_lowest_auroc(torch.from_numpy(scores), torch.from_numpy(labels), 10_000) == pytest.approx(full)
    with pytest.raises(ValueError, match="K must be >= 1"):
        k_lowest_auroc(torch.from_numpy(scores), torch.from_numpy(labels), 0)


def test_rank_agreement_equals_scipy():
    rng = np.random.default_rng(0)
    names = [f"c{i}" for i in range(7)]
    real = dict(zip(names, rng.random(7).tolist(), strict=True))
    synthetic = dict(zip(names, rng.random(7).tolist(), strict=True))
    got = rank_agreement(real, synthetic)
    r, s = list(real.values()), list(synthetic.values())
    assert got["spearman"] == pytest.approx(spearmanr(r, s).statistic)
    assert got["kendall"] == pytest.approx(kendalltau(r, s).statistic)
    selected, best = names[int(np.argmax(s))], names[int(np.argmax(r))]
    assert (got["selected"], got["best"]) == (selected, best)
    assert got["regret"] == pytest.approx(real[best] - real[selected])
    assert got["top1_agreement"] == (selected == best)


def test_rank_agreement_is_nan_safe_and_fair_to_ties():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scipy ConstantInputWarning
        flat = rank_agreement({"a": 0.9, "b": 0.7, "c": 0.8}, {"a": 1.0, "b": 1.0, "c": 1.0})
        single = rank_agreement({"a": 0.9}, {"a": 0.5})
    assert math.isnan(flat["spearman"]) and math.isnan(flat["kendall"])
    assert flat["selected"] == "a" and flat["top1_agreement"]  # ties: the first candidate
    assert math.isnan(single["spearman"]) and single["top1_agreement"] and single["regret"] == 0.0
    tied = rank_agreement({"a": 0.9, "b": 0.9, "c": 0.5}, {"a": 0.1, "b": 0.8, "c": 0.3})
    assert (tied["selected"], tied["best"], tied["top1_agreement"], tied["regret"]) == ("b", "a", True, 0.0)
    with pytest.raises(ValueError, match="only real \\['c'\\]"):
        rank_agreement({"a": 1.0, "c": 0.5}, {"a": 1.0})
    with pytest.raises(ValueError, match="synthetic values of b are not finite"):
        rank_agreement({"a": 1.0, "b": 0.5}, {"a": 1.0, "b": float("nan")})


def _result(task: str, real: dict, synthetic: dict) -> dict:
    """A score_task-shaped result with one validation set ("v") and K = all only."""
    return {"task": task, "candidates": {
        c: {"real": {key: real[c] for key in REAL_KEYS}, "synthetic": {"v": {"all": synthetic[c]}}} for c in real}}


def test_summarize_means_over_tasks_and_on_the_means():
    t1 = _result("t1", {"a": 0.9, "b": 0.6, "c": 0.7}, {"a": 0.8, "b": 0.5, "c": 0.9})
    t2 = _result("t2", {"a": 0.95, "b": 0.65, "c": 0.6}, {"a": 0.7, "b": 0.7, "c": 0.7})  # constant synthetic
    t3 = _result("t3", {"a": 0.5, "b": 0.8, "c": 0.7}, {"a": 0.6, "b": 0.9, "c": 0.4})
    summary = summarize([t1, t2, t3])
    a = summary["agreement"]["v"]["all"]["image_AUROC"]
    rho1 = spearmanr([0.9, 0.6, 0.7], [0.8, 0.5, 0.9]).statistic
    rho3 = spearmanr([0.5, 0.8, 0.7], [0.6, 0.9, 0.4]).statistic
    assert a["spearman"] == pytest.approx((rho1 + rho3) / 2) and a["num_correlated"] == 2  # t2 has no correlation
    # selected: t1 c (best a), t2 a (tie -> first; best a), t3 b (best b)
    assert a["top1_rate"] == pytest.approx(2 / 3)
    assert a["regret"] == pytest.approx((0.9 - 0.7) / 3)
    means_real = {"a": (0.9 + 0.95 + 0.5) / 3, "b": (0.6 + 0.65 + 0.8) / 3, "c": (0.7 + 0.6 + 0.7) / 3}
    means_syn = {"a": (0.8 + 0.7 + 0.6) / 3, "b": (0.5 + 0.7 + 0.9) / 3, "c": (0.9 + 0.7 + 0.4) / 3}
    assert summary["mean_real"]["image_AUROC"] == pytest.approx(means_real)
    assert summary["mean_synthetic"]["v"]["all"] == pytest.approx(means_syn)
    expected = rank_agreement(means_real, means_syn)
    assert a["dataset"]["spearman"] == pytest.approx(expected["spearman"])
    assert a["dataset"]["selected"] == expected["selected"]
    assert summary["per_task"]["t3"]["v"]["all"]["image_AUROC"]["selected"] == "b"
    # synthetic - real per candidate, by hand: a (-0.1, -0.25, +0.1), b (-0.1, +0.05, +0.1), c (+0.2, +0.1, -0.3)
    assert summary["gap"]["v"]["all"]["image_AUROC"] == pytest.approx({"a": -0.25 / 3, "b": 0.05 / 3, "c": 0.0})
    assert summary["abs_gap"]["v"]["all"]["image_AUROC"] == pytest.approx({"a": 0.45 / 3, "b": 0.25 / 3, "c": 0.6 / 3})
    assert a["abs_gap"] == pytest.approx((0.45 + 0.25 + 0.6) / 9)
    with pytest.raises(ValueError, match="other validation sets or K values"):
        summarize([t1, {**t3, "candidates": {c: {**v, "synthetic": {"w": {"all": 0.5}}}
                                             for c, v in t3["candidates"].items()}}])


def test_selection_finds_the_informative_candidate(tmp_path):
    tasks = [_task("t0", seed=0), _task("t1", seed=1)]
    candidates = candidates_from_config({"rgb": None, "left": "left", "noise": {"extractor": "noise", "k": 3}})
    cache = FeatureCache(tmp_path / "features")
    result = select_models(tasks, candidates, _extractors(), cache, k_values=(3, None))
    s = result.summary
    real, synthetic = s["mean_real"]["image_AUROC"], s["mean_synthetic"]["patch"]["all"]
    assert real["rgb"] > real["left"] > real["noise"] and synthetic["rgb"] > synthetic["left"] > synthetic["noise"]
    assert real["rgb"] > 0.9 and abs(real["noise"] - 0.5) < 0.2
    for key in REAL_KEYS:
        a = s["agreement"]["patch"]["all"][key]
        assert a["dataset"]["selected"] == a["dataset"]["best"] == "rgb" and a["dataset"]["top1_agreement"]
        assert a["dataset"]["regret"] == 0.0
        per_task = [s["per_task"][t]["patch"]["all"][key] for t in ("t0", "t1")]
        assert a["top1_rate"] == np.mean([p["top1_agreement"] for p in per_task]) == 1.0
        assert a["spearman"] == pytest.approx(np.mean([p["spearman"] for p in per_task]))
    expected = spearmanr(list(real.values()), list(synthetic.values())).statistic
    assert s["agreement"]["patch"]["all"]["image_AUROC"]["dataset"]["spearman"] == pytest.approx(expected) == 1.0
    # each image's features were computed once per extractor, though three candidates and two roles share them
    images = sum(len(t.bank) + len(t.test_set) + 12 for t in tasks)
    assert all(cache.num_computed[e] == images for e in ("rgb", "left", "noise"))
    assert cache.file("rgb").is_file()  # saved at the end
    data = result.to_dict()
    json.dumps(data, allow_nan=False)
    assert data["k_values"] == ["3", "all"] and [c["name"] for c in data["candidates"]] == ["rgb", "left", "noise"]


def test_protocol_errors_are_caught():
    task = _task("t0", seed=0)
    candidates = [Candidate("rgb", "rgb")]
    cache = FeatureCache()
    extractors = _extractors()
    leaky = SelectionTask("leaky", task.bank, task.bank, task.test_set, task.validation_sets)
    with pytest.raises(DatasetError, match="both in the bank"):
        score_task(leaky, candidates, extractors, cache)
    with pytest.raises(DatasetError, match="test set.*both in the bank"):
        score_task(SelectionTask("t", task.bank, task.synthetic_bank, task.bank,
                                 task.validation_sets), candidates, extractors, cache)
    normals_only = {"patch": task.validation_sets["patch"].datasets[0]}
    with pytest.raises(DatasetError, match="no anomalous image"):
        score_task(SelectionTask("t", task.bank, task.synthetic_bank, task.test_set, normals_only), candidates,
                   extractors, cache)
    with pytest.raises(DatasetError, match="holds images labelled anomalous"):
        score_task(SelectionTask("t", task.test_set, task.synthetic_bank, task.test_set, task.validation_sets),
                   candidates, extractors, cache)
    with pytest.raises(ValueError, match="no extractor named 'hog'.*given: rgb, left, noise"):
        score_task(task, [Candidate("h", "hog")], extractors, cache)
    other = SelectionTask("t1", task.bank, task.synthetic_bank, task.test_set, {"other": task.validation_sets["patch"]})
    with pytest.raises(ValueError, match="same ones"):
        select_models([task, other], candidates, extractors, cache)


def test_candidates_from_config():
    from omegaconf import OmegaConf

    mapping = OmegaConf.create({"r18": {"extractor": "resnet18", "k": 5, "reducer": "pca:64"}, "hog": None,
                                "vit": "vit_b_16"})
    assert candidates_from_config(mapping) == [Candidate("r18", "resnet18", 5, "euclidean", "pca:64"),
                                               Candidate("hog", "hog"), Candidate("vit", "vit_b_16")]
    listed = OmegaConf.create([{"name": "a", "extractor": "x", "distance": "squared"}])
    assert candidates_from_config(listed) == [Candidate("a", "x", distance="squared")]
    with pytest.raises(ValueError, match="unknown key\\(s\\) kk"):
        candidates_from_config({"a": {"kk": 3}})
    with pytest.raises(ValueError, match="reducer must be null or 'pca:<d>'"):
        candidates_from_config({"a": {"reducer": "umap:3"}})
    with pytest.raises(ValueError, match="distance must be one of"):
        Candidate("a", "x", distance="plain2")
    with pytest.raises(ValueError, match="repeated: a"):
        candidates_from_config([{"name": "a"}, {"name": "a"}])
