"""Model selection by synthetic validation.

A :class:`Candidate` is a kNN detector over a feature extractor: the bank is the features of the support normals,
the score of an image is the aggregated distance to its ``k`` nearest bank features (``"euclidean"``: the sum of
plain L2 distances, the paper's default with k = 3; ``"squared"``: the sum of squared ones), optionally after a
PCA fitted on the bank. For each task (one normal class) every candidate gets

- *real* AUROCs on the labelled test split: one-vs-rest, the one-vs-one mean and the one-vs-one closest (worst)
  over out-classes (the anomalies' ``defect_type``), and
- *synthetic* AUROCs on each validation set (held-out normals, label 0, + synthetic anomalies, label 1), scored
  against the synthetic bank (the support minus the held-out normals), with every anomaly and with only the K
  anomalies that the candidate scores lowest (its hardest ones).

Selection takes the candidate with the best synthetic AUROC (ties: the first candidate). It is judged by the rank
correlation of synthetic and real AUROC over candidates (Spearman, Kendall), whether the selected candidate is the
real best (top-1) and its regret (best real AUROC − selected real AUROC), per task and on the means over tasks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from anomgen.data.record import ANOMALOUS, NORMAL
from anomgen.detectors.knn import DISTANCES, KNNScorer
from anomgen.detectors.pca import PCAReducer
from anomgen.errors import DatasetError
from anomgen.files import to_json
from anomgen.metrics import auroc
from anomgen.selection.evaluation import image_metrics
from anomgen.selection.features import FeatureCache, dataset_entries, with_entries

#: the real benchmarks: one-vs-rest, one-vs-one mean over out-classes, one-vs-one closest out-class
REAL_KEYS = ("image_AUROC", "image_AUROC_one_vs_one_mean", "image_AUROC_one_vs_one_closest")
DEFAULT_K_VALUES = (3, 5, 10, None)
ALL = "all"
CANDIDATE_FIELDS = ("extractor", "k", "distance", "reducer")


def k_label(k: int | None) -> str:
    """The key of a K value in results: ``"3"``, ..., ``"all"`` for ``None`` (every anomaly)."""
    return ALL if k is None else str(int(k))


# ------------------------------------------------------------------------------------------------------ candidates


@dataclass(frozen=True)
class Candidate:
    """A kNN detector over the features of the extractor named ``extractor``.

    ``distance``: ``"euclidean"`` (sum of plain L2 distances) or ``"squared"``; ``reducer``: ``None`` or
    ``"pca:<d>"`` (a :class:`~anomgen.detectors.pca.PCAReducer` fitted on the bank).
    """

    name: str
    extractor: str
    k: int = 3
    distance: str = "euclidean"
    reducer: str | None = None

    def __post_init__(self) -> None:
        if not self.name or not self.extractor:
            raise ValueError(f"candidate {self.name!r}: name and extractor must be non-empty")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"candidate {self.name!r}: k must be an int >= 1, got {self.k!r}")
        if self.distance not in DISTANCES:
            raise ValueError(f"candidate {self.name!r}: distance must be one of {DISTANCES}, got {self.distance!r}")
        self.make_reducer()

    def make_reducer(self) -> PCAReducer | None:
        """A fresh (unfitted) reducer, or None."""
        if self.reducer is None:
            return None
        kind, _, size = str(self.reducer).partition(":")
        if kind != "pca" or not size.isdigit() or int(size) < 1:
            raise ValueError(f"candidate {self.name!r}: reducer must be null or 'pca:<d>' with d >= 1, "
                             f"got {self.reducer!r}")
        return PCAReducer(int(size))

    def scorer(self, bank: torch.Tensor):
        """``score(queries) -> scores``: kNN over ``bank`` after the reducer fitted on it."""
        reducer = self.make_reducer()
        if reducer is not None:
            bank = reducer.fit_transform(bank)
        knn = KNNScorer(k=self.k, distance=self.distance).fit(bank)
        return lambda queries: knn.score(queries if reducer is None else reducer.transform(queries))


def candidates_from_config(config: Mapping | Sequence) -> list[Candidate]:
    """Candidates from a config: ``{name: {extractor, k, distance, reducer}}`` (a string value is the extractor;
    a missing extractor is the name itself), or a list of such mappings each with a ``name``."""
    if isinstance(config, Mapping):
        items = [(str(n), {"extractor": v} if isinstance(v, str) else dict(v or {})) for n, v in config.items()]
    elif isinstance(config, Sequence) and not isinstance(config, str):
        items = []
        for i, spec in enumerate(config):
            if not isinstance(spec, Mapping) or "name" not in spec:
                raise ValueError(f"candidates[{i}]: expected a mapping with a 'name', got {spec!r}")
            spec = dict(spec)
            items.append((str(spec.pop("name")), spec))
    else:
        raise TypeError(f"candidates: expected a mapping or a list, got {type(config).__name__}")
    out = []
    for name, spec in items:
        unknown = sorted(set(spec) - set(CANDIDATE_FIELDS))
        if unknown:
            raise ValueError(f"candidate {name!r}: unknown key(s) {', '.join(unknown)}; known: "
                             f"{', '.join(CANDIDATE_FIELDS)}")
        spec.setdefault("extractor", name)
        if "k" in spec:
            spec["k"] = int(spec["k"])
        out.append(Candidate(name=name, **spec))
    _check_unique([c.name for c in out])
    return out


def _check_unique(names: Sequence[str]) -> None:
    dup = sorted({n for n in names if list(names).count(n) > 1})
    if dup:
        raise ValueError(f"candidate names must be unique; repeated: {', '.join(dup)}")


# ----------------------------------------------------------------------------------------------------------- tasks


@dataclass
class SelectionTask:
    """One normal class: ``bank`` (support normals, the bank for real scoring), ``synthetic_bank`` (the bank for
    synthetic scoring: the support minus the held-out normals; may be ``bank`` itself), ``test_set`` (labelled, a
    ``defect_type`` per anomaly) and ``validation_sets`` (name -> held-out normals + synthetic anomalies)."""

    name: str
    bank: Dataset
    synthetic_bank: Dataset
    test_set: Dataset
    validation_sets: dict[str, Dataset] = field(default_factory=dict)


def _labels(entries, what: str) -> tuple[torch.Tensor, list[str]]:
    labels = torch.tensor([int(e.label) for e in entries], dtype=torch.long)
    bad = sorted({int(v) for v in labels.tolist()} - {NORMAL, ANOMALOUS})
    if bad:
        raise DatasetError(f"{what}: labels must be 0 (normal) or 1 (anomalous), got {bad}; a task protocol must "
                           "label the data first")
    return labels, [str(e.defect_type) for e in entries]


def _check_disjoint(bank_paths: Sequence[str], other_paths: Sequence[str], what: str) -> None:
    shared = sorted(set(bank_paths) & set(other_paths))
    if shared:
        raise DatasetError(f"{what}: {len(shared)} image(s) are both in the bank and scored against it (e.g. "
                           f"{', '.join(shared[:3])}); their distance 0 to themselves would inflate the AUROC")


def k_lowest_auroc(scores: torch.Tensor, labels: torch.Tensor, k: int | None) -> float:
    """AUROC of the normals against the ``k`` anomalies with the lowest scores (``None`` or ``k`` >= their number:
    every anomaly)."""
    scores, labels = torch.as_tensor(scores).flatten(), torch.as_tensor(labels).flatten()
    anomalies = scores[labels == ANOMALOUS]
    if k is not None:
        if k < 1:
            raise ValueError(f"K must be >= 1 or None (every anomaly), got {k}")
        anomalies = anomalies.sort().values[:k]
    normals = scores[labels == NORMAL]
    labels_kept = torch.cat([torch.zeros(len(normals)), torch.ones(len(anomalies))]).long()
    return auroc(torch.cat([normals, anomalies]), labels_kept)


def score_task(task: SelectionTask, candidates: Sequence[Candidate], extractors: Mapping[str, nn.Module],
               cache: FeatureCache, k_values: Sequence[int | None] = DEFAULT_K_VALUES,
               batch_size: int = 256) -> dict:
    """Real and synthetic AUROCs of every candidate on one task.

    Returns ``{"task", "sizes", "candidates": {name: {"real": {<REAL_KEYS>, "closest_out_class",
    "per_out_class"}, "synthetic": {validation set: {K label: AUROC}}}}}``, where the K labels are those of
    ``k_values`` (``"all"`` = the whole set's AUROC).
    """
    if not task.validation_sets:
        raise ValueError(f"task {task.name!r}: no validation set")
    _check_candidates(candidates, extractors)
    datasets = {"bank": task.bank, "synthetic_bank": task.synthetic_bank, "test_set": task.test_set,
                **{f"validation set {n!r}": d for n, d in task.validation_sets.items()}}
    entries, views, seen = {}, {}, {}
    for role, ds in datasets.items():
        if id(ds) not in seen:  # a dataset given in two roles (bank = synthetic bank) is viewed once
            seen[id(ds)] = with_entries(ds)
        views[role] = seen[id(ds)]
        entries[role] = dataset_entries(views[role])
        if not entries[role]:
            raise DatasetError(f"task {task.name!r}: the {role} is empty")
    where = f"task {task.name!r}"
    paths = {role: [e.image_path for e in es] for role, es in entries.items()}
    for role in ("bank", "synthetic_bank"):
        labels, _ = _labels([e for e in entries[role] if e.label != -1], f"{where}: {role}")
        if (labels == ANOMALOUS).any():
            raise DatasetError(f"{where}: the {role} holds images labelled anomalous; a bank holds normals only")
    test_labels, test_defects = _labels(entries["test_set"], f"{where}: test set")
    _check_disjoint(paths["bank"], paths["test_set"], f"{where}: test set")
    val_labels = {}
    for name in task.validation_sets:
        role = f"validation set {name!r}"
        val_labels[name], _ = _labels(entries[role], f"{where}: {role}")
        for value, kind in ((NORMAL, "normal"), (ANOMALOUS, "anomalous")):
            if not (val_labels[name] == value).any():
                raise DatasetError(f"{where}: {role} has no {kind} image (held-out normals + synthetic anomalies)")
        _check_disjoint(paths["synthetic_bank"], paths[role], f"{where}: {role}")

    feats: dict[str, dict[str, torch.Tensor]] = {}
    for ename in dict.fromkeys(c.extractor for c in candidates):
        feats[ename] = {role: cache.features(ename, extractors[ename], views[role], batch_size) for role in views}

    labels_k = [k_label(k) for k in k_values]
    results = {}
    for cand in candidates:
        f = feats[cand.extractor]
        metrics, per_class = image_metrics(cand.scorer(f["bank"])(f["test_set"]), test_labels, test_defects)
        real = {key: float(metrics[key]) for key in REAL_KEYS}
        real.update(closest_out_class=metrics["closest_out_class"], per_out_class=per_class)
        score_synthetic = cand.scorer(f["synthetic_bank"])
        synthetic = {}
        for name in task.validation_sets:
            scores = score_synthetic(f[f"validation set {name!r}"])
            synthetic[name] = {label: k_lowest_auroc(scores, val_labels[name], k)
                               for label, k in zip(labels_k, k_values, strict=True)}
        results[cand.name] = {"real": real, "synthetic": synthetic}
    sizes = {"bank": len(paths["bank"]), "synthetic_bank": len(paths["synthetic_bank"]),
             "test": {"normal": int((test_labels == NORMAL).sum()), "anomalous": int((test_labels == ANOMALOUS).sum())},
             "validation": {n: {"normal": int((v == NORMAL).sum()), "anomalous": int((v == ANOMALOUS).sum())}
                            for n, v in val_labels.items()}}
    return {"task": task.name, "sizes": sizes, "candidates": results}


def _check_candidates(candidates: Sequence[Candidate], extractors: Mapping[str, nn.Module]) -> None:
    if not candidates:
        raise ValueError("no candidate to select from")
    _check_unique([c.name for c in candidates])
    missing = sorted({c.extractor for c in candidates} - set(extractors))
    if missing:
        raise ValueError(f"no extractor named {', '.join(map(repr, missing))} (used by candidates "
                         f"{', '.join(c.name for c in candidates if c.extractor in missing)}); extractors given: "
                         f"{', '.join(extractors) or 'none'}")


# ------------------------------------------------------------------------------------------------------- agreement


def rank_agreement(real: Mapping[str, float], synthetic: Mapping[str, float]) -> dict:
    """How well ``synthetic`` (per candidate) ranks the candidates by ``real``.

    ``spearman`` / ``kendall`` (tau-b; NaN with fewer than 2 candidates or a constant side), ``selected`` (best
    synthetic; ties: the first in ``real``'s order), ``best`` (best real), their real values, ``top1_agreement``
    (the selected candidate reaches the best real value) and ``regret`` (best real − selected real).
    """
    from scipy.stats import kendalltau, spearmanr

    if set(real) != set(synthetic):
        raise ValueError(f"rank_agreement: the candidates differ: only real {sorted(set(real) - set(synthetic))}, "
                         f"only synthetic {sorted(set(synthetic) - set(real))}")
    names = list(real)
    if not names:
        raise ValueError("rank_agreement: no candidate")
    r = np.array([float(real[n]) for n in names])
    s = np.array([float(synthetic[n]) for n in names])
    for values, side in ((r, "real"), (s, "synthetic")):
        if not np.isfinite(values).all():
            bad = [n for n, v in zip(names, values, strict=True) if not np.isfinite(v)]
            raise ValueError(f"rank_agreement: {side} values of {', '.join(bad)} are not finite")
    spearman = kendall = math.nan
    if len(names) >= 2 and np.ptp(r) > 0 and np.ptp(s) > 0:
        spearman = float(spearmanr(r, s).statistic)
        kendall = float(kendalltau(r, s).statistic)
    selected, best = names[int(np.argmax(s))], names[int(np.argmax(r))]
    return {"spearman": spearman, "kendall": kendall, "top1_agreement": bool(real[selected] >= real[best]),
            "selected": selected, "best": best, "selected_real": float(real[selected]),
            "best_real": float(real[best]), "regret": float(real[best]) - float(real[selected])}


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def summarize(per_task_results: Sequence[Mapping], real_keys: Sequence[str] = REAL_KEYS) -> dict:
    """Agreement of synthetic with real AUROC, per validation set, K and benchmark (``real_keys``).

    Returns ``{"tasks", "candidates", "validation_sets", "k", "mean_real": {real key: {candidate: mean over
    tasks}}, "mean_synthetic": {set: {K: {candidate: mean}}}, "gap" / "abs_gap": {set: {K: {real key: {candidate:
    mean over tasks of synthetic − real AUROC / of its absolute value}}}}, "per_task": {task: {set: {K: {real key:
    rank_agreement}}}}, "agreement": {set: {K: {real key: {"spearman", "kendall" (means over the tasks where they
    are defined), "num_correlated" (how many), "top1_rate", "regret" (means over tasks), "abs_gap" (mean of
    abs_gap over the candidates), "dataset": rank_agreement of the means over tasks}}}}}``.
    """
    if not per_task_results:
        raise ValueError("summarize: no task results")
    first = per_task_results[0]
    candidates = list(first["candidates"])
    sets = list(next(iter(first["candidates"].values()))["synthetic"])
    ks = list(next(iter(next(iter(first["candidates"].values()))["synthetic"].values())))
    for res in per_task_results:
        if list(res["candidates"]) != candidates:
            raise ValueError(f"summarize: task {res['task']!r} has candidates {list(res['candidates'])}, the first "
                             f"task {candidates}")
        for cand in res["candidates"].values():
            if list(cand["synthetic"]) != sets or any(list(v) != ks for v in cand["synthetic"].values()):
                raise ValueError(f"summarize: task {res['task']!r} has other validation sets or K values than the "
                                 f"first task ({sets}, K {ks})")
    tasks = [res["task"] for res in per_task_results]
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"summarize: task names must be unique, got {tasks}")

    def real_of(res, key):
        return {c: res["candidates"][c]["real"][key] for c in candidates}

    def synthetic_of(res, vs, k):
        return {c: res["candidates"][c]["synthetic"][vs][k] for c in candidates}

    mean_real = {key: {c: float(np.mean([real_of(r, key)[c] for r in per_task_results])) for c in candidates}
                 for key in real_keys}
    mean_synthetic = {vs: {k: {c: float(np.mean([synthetic_of(r, vs, k)[c] for r in per_task_results]))
                               for c in candidates} for k in ks} for vs in sets}
    # how far synthetic AUROC is from real, per candidate: synthetic - real per task, then its mean (gap) and the
    # mean of its absolute value (abs_gap)
    diffs = {vs: {k: {key: {c: np.array([synthetic_of(r, vs, k)[c] - real_of(r, key)[c] for r in per_task_results])
                            for c in candidates} for key in real_keys} for k in ks} for vs in sets}
    gap = {vs: {k: {key: {c: float(d.mean()) for c, d in by_c.items()} for key, by_c in by_key.items()}
                for k, by_key in by_k.items()} for vs, by_k in diffs.items()}
    abs_gap = {vs: {k: {key: {c: float(np.abs(d).mean()) for c, d in by_c.items()} for key, by_c in by_key.items()}
                    for k, by_key in by_k.items()} for vs, by_k in diffs.items()}
    per_task = {res["task"]: {vs: {k: {key: rank_agreement(real_of(res, key), synthetic_of(res, vs, k))
                                       for key in real_keys} for k in ks} for vs in sets}
                for res in per_task_results}
    agreement: dict = {}
    for vs in sets:
        agreement[vs] = {}
        for k in ks:
            agreement[vs][k] = {}
            for key in real_keys:
                rows = [per_task[t][vs][k][key] for t in tasks]
                spearman = [row["spearman"] for row in rows]
                agreement[vs][k][key] = {
                    "spearman": _nanmean(spearman),
                    "kendall": _nanmean([row["kendall"] for row in rows]),
                    "num_correlated": sum(not math.isnan(v) for v in spearman),
                    "top1_rate": float(np.mean([row["top1_agreement"] for row in rows])),
                    "regret": float(np.mean([row["regret"] for row in rows])),
                    "abs_gap": float(np.mean(list(abs_gap[vs][k][key].values()))),
                    "dataset": rank_agreement(mean_real[key], mean_synthetic[vs][k]),
                }
    return {"tasks": tasks, "candidates": candidates, "validation_sets": sets, "k": ks, "mean_real": mean_real,
            "mean_synthetic": mean_synthetic, "gap": gap, "abs_gap": abs_gap, "per_task": per_task,
            "agreement": agreement}


# ------------------------------------------------------------------------------------------------------- selection


@dataclass
class SelectionResult:
    """Per-task results (:func:`score_task`) and their :func:`summarize` summary."""

    candidates: list[Candidate]
    k_values: list[int | None]
    tasks: list[dict]
    summary: dict

    @property
    def validation_sets(self) -> list[str]:
        return list(self.summary["validation_sets"])

    @property
    def real_keys(self) -> list[str]:
        return list(self.summary["mean_real"])

    def to_dict(self) -> dict:
        """Plain JSON data (NaN and infinities become ``None``)."""
        return to_json({"candidates": [asdict(c) for c in self.candidates],
                        "k_values": [k_label(k) for k in self.k_values],
                        "tasks": self.tasks, "summary": self.summary})


def select_models(tasks: Sequence[SelectionTask], candidates: Sequence[Candidate], extractors: Mapping[str, nn.Module],
                  cache: FeatureCache | None = None, k_values: Sequence[int | None] = DEFAULT_K_VALUES,
                  batch_size: int = 256, real_keys: Sequence[str] = REAL_KEYS) -> SelectionResult:
    """Score every candidate on every task (:func:`score_task`) and summarise the agreement (:func:`summarize`).

    Every task must have the same validation-set names. ``cache`` defaults to an in-memory :class:`FeatureCache`;
    a cache with a directory is saved at the end.
    """
    if not tasks:
        raise ValueError("select_models: no task")
    _check_candidates(candidates, extractors)
    labels = [k_label(k) for k in k_values]
    if not labels or len(set(labels)) != len(labels):
        raise ValueError(f"k_values must be non-empty and distinct, got {list(k_values)}")
    sets = list(tasks[0].validation_sets)
    for task in tasks:
        if sorted(task.validation_sets) != sorted(sets):
            raise ValueError(f"task {task.name!r} has validation sets {sorted(task.validation_sets)}, task "
                             f"{tasks[0].name!r} has {sorted(sets)}: every task needs the same ones")
    cache = FeatureCache() if cache is None else cache
    per_task = []
    for task in tasks:
        ordered = SelectionTask(task.name, task.bank, task.synthetic_bank, task.test_set,
                                {n: task.validation_sets[n] for n in sets})
        per_task.append(score_task(ordered, candidates, extractors, cache, k_values, batch_size))
    cache.save()
    return SelectionResult(list(candidates), list(k_values), per_task, summarize(per_task, real_keys))


__all__ = [
    "DEFAULT_K_VALUES",
    "REAL_KEYS",
    "Candidate",
    "SelectionResult",
    "SelectionTask",
    "candidates_from_config",
    "k_label",
    "k_lowest_auroc",
    "rank_agreement",
    "score_task",
    "select_models",
    "summarize",
]
