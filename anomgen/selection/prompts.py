"""Prompt selection for zero-shot CLIP anomaly detection, by synthetic validation.

A :class:`PromptPool` holds templates with one ``{}`` slot: the normal prompt puts the class name in the slot, the
anomalous prompt a generic phrase ("some bird", "something"), each made grammatical by :func:`fill_slot` ("a photo
of a {}." gives "a photo of an apple.", "a photo of some bird.", "a photo of something."). The shipped pools are data
files of the package, ``anomgen/prompts/<name>.yaml``, each saying in its header where its templates come from;
:meth:`PromptPool.load` takes such a name or a path. :func:`prompt_aurocs` gives the AUROC of every prompt
pair on one labelled set (real test data, a synthetic validation set, or normals against another dataset's images).
:func:`select_prompts` picks one prompt per task by each strategy and reports how often the pick is the task's real
best prompt and the mean real AUROC of the picks; :func:`render_prompt_table` lays that out as a markdown table.
"""

from __future__ import annotations

import os
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from anomgen.detectors.clip_zero_shot import anomaly_probabilities
from anomgen.metrics.functional import MissingClassError, as_labels

POOL_KEYS = ("name", "anomaly_word", "default", "templates")
#: the shipped pools (package data)
POOL_DIR = Path(__file__).resolve().parent.parent / "prompts"

#: words that open a noun phrase with their own determiner: they take the article's place ("some bird")
DETERMINERS = frozenset({"some", "any", "another", "every", "each", "no", "this", "that", "these", "those", "my",
                         "your", "its", "their", "our", "his", "her", "a", "an", "the"})
#: indefinite pronouns: the article goes and the template's modifiers follow them ("something small")
PRONOUNS = frozenset({"something", "anything", "nothing", "everything", "someone", "somebody", "anyone",
                      "anybody", "everyone", "everybody"})
_A_BEFORE = ("eu", "uni", "use", "usu", "uti", "one", "once")  # vowel letters with a consonant sound: "a unicorn"
_AN_BEFORE = ("hour", "honest", "honor", "honour", "heir")      # a silent h: "an hour"


def shipped_pools() -> list[str]:
    """The names of the pools shipped with the package (``anomgen/prompts/*.yaml``)."""
    return sorted(p.stem for p in POOL_DIR.glob("*.yaml"))


def indefinite_article(word: str) -> str:
    """"a" or "an" before ``word``, by its first letters (with the common exceptions: "a unicorn", "an hour")."""
    w = word.lower()
    if w.startswith(_AN_BEFORE):
        return "an"
    if w.startswith(_A_BEFORE):
        return "a"
    return "an" if w[:1] in "aeiou" else "a"


#: words that end a run of modifiers when read backwards from the slot ("a photo of {}" has no article of its own)
_BOUNDARIES = frozenset({"of", "in", "on", "at", "for", "with", "by", "from", "into", "and", "or", "is", "are"})


def fill_slot(template: str, phrase: str) -> str:
    """``template`` (one ``{}`` slot) with ``phrase`` in it, the article in front of the slot's noun phrase made to
    agree. Read backwards from the slot over modifier words ("a photo of a small {}": "small") to an article:

    - a plain phrase (a class name) gets the right indefinite article ("an apple", "a small apple"); "the" stays;
    - a phrase with its own determiner takes the article's place ("a photo of some small bird");
    - an indefinite pronoun takes the article's place and the modifiers follow it ("a photo of something small").

    With no article before the slot ("a photo of {}", "{} in a video game") the phrase goes in as it is.
    """
    if template.count("{}") != 1:
        raise ValueError(f"a prompt template needs exactly one '{{}}' slot, got {template!r}")
    head, tail = template.split("{}")
    words = phrase.split()
    if not words or (head and not head[-1].isspace()):
        return f"{head}{phrase}{tail}"
    head_words = head.split()
    i = len(head_words) - 1
    while i >= 0 and head_words[i].lower() not in ("a", "an", "the"):
        word = head_words[i]
        if word.lower() in _BOUNDARIES or not all(c.isalnum() or c == "-" for c in word):
            return f"{head}{phrase}{tail}"
        i -= 1
    if i < 0:
        return f"{head}{phrase}{tail}"
    prefix, article, modifiers = head_words[:i], head_words[i], head_words[i + 1:]
    first = words[0].lower()
    if first in DETERMINERS:
        body = [words[0], *modifiers, *words[1:]]
    elif first in PRONOUNS:
        body = [*words, *modifiers]
    elif article.lower() == "the":
        body = [article, *modifiers, *words]
    else:
        body = [indefinite_article((modifiers or words)[0]), *modifiers, *words]
    if not prefix and article[:1].isupper():
        body[0] = body[0][:1].upper() + body[0][1:]
    return " ".join([*prefix, *body]) + tail


#: Row labels of :func:`render_prompt_table`, in table order.
STRATEGY_LABELS = {
    "synthetic": "synthetic validation",
    "random": "random (expected)",
    "random_draw": "random (one seeded draw)",
    "default": "default prompt",
    "other_dataset": "other dataset as anomalies",
    "global_best": "global best (oracle)",
    "best": "best (oracle)",
    "worst": "worst (oracle)",
}


@dataclass(frozen=True)
class PromptPool:
    """Prompt templates with one ``{}`` slot each, the anomaly word and the default template's index."""

    name: str
    anomaly_word: str
    templates: tuple[str, ...]
    default_index: int
    source: str = "<mapping>"

    @classmethod
    def load(cls, path: str | os.PathLike) -> PromptPool:
        """Read a pool from a YAML file with keys ``name``, ``anomaly_word``, ``default``, ``templates``: a path, or
        the name of a shipped pool (``anomgen/prompts/<name>.yaml``: :func:`shipped_pools`)."""
        import yaml

        if isinstance(path, str) and path in shipped_pools():
            path = POOL_DIR / f"{path}.yaml"
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"prompt pool file {path} not found (shipped pools: "
                                    f"{', '.join(shipped_pools())})")
        with path.open(encoding="utf-8") as f:
            data = yaml.safe_load(f)
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def from_mapping(cls, data: Mapping, source: str = "<mapping>") -> PromptPool:
        """Build a pool from a mapping shaped like the YAML file; ``source`` names it in errors."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: a prompt pool is a mapping with keys {', '.join(POOL_KEYS)}, "
                             f"got {type(data).__name__}")
        missing = [k for k in POOL_KEYS if k not in data]
        unknown = sorted(str(k) for k in data if k not in POOL_KEYS)
        if missing or unknown:
            raise ValueError(f"{source}: prompt pool keys must be {', '.join(POOL_KEYS)}"
                             + (f"; missing: {', '.join(missing)}" if missing else "")
                             + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
        for key in ("name", "anomaly_word"):
            if not isinstance(data[key], str) or not data[key].strip():
                raise ValueError(f"{source}: {key} must be a non-empty string, got {data[key]!r}")
        templates = data["templates"]
        if isinstance(templates, str) or not isinstance(templates, Sequence) or not templates:
            raise ValueError(f"{source}: templates must be a non-empty list of strings, got {templates!r}")
        for i, template in enumerate(templates):
            _check_template(template, i, source)
        seen: dict[str, int] = {}
        for i, template in enumerate(templates):
            if template in seen:
                raise ValueError(f"{source}: template {i} {template!r} repeats template {seen[template]}")
            seen[template] = i
        return cls(data["name"], data["anomaly_word"], tuple(templates),
                   _default_index(data["default"], templates, source), source)

    def __len__(self) -> int:
        return len(self.templates)

    @property
    def default(self) -> str:
        """The default template."""
        return self.templates[self.default_index]

    def pairs(self, class_name: str) -> list[tuple[str, str]]:
        """``(normal, anomalous)`` prompt per template: ``class_name`` / the anomaly word in the slot.

        ``class_name`` goes in as given (e.g. "metal nut", not the folder name "metal_nut")."""
        return [(fill_slot(t, class_name), fill_slot(t, self.anomaly_word)) for t in self.templates]


def _check_template(template, index: int, source: str) -> None:
    if not isinstance(template, str):
        raise ValueError(f"{source}: template {index} must be a string, got {template!r}")
    try:
        fields = [(field, spec, conv) for _, field, spec, conv in string.Formatter().parse(template)
                  if field is not None]
    except ValueError as err:
        raise ValueError(f"{source}: template {index} {template!r} is not a valid template ({err}); "
                         "it must have exactly one '{}' slot") from None
    if len(fields) != 1 or fields[0] != ("", "", None):
        raise ValueError(f"{source}: template {index} {template!r} must have exactly one '{{}}' slot "
                         f"(and no other braces), found {len(fields)} slot(s)")


def _default_index(default, templates: Sequence[str], source: str) -> int:
    if isinstance(default, bool):
        raise ValueError(f"{source}: default must be a template index or a template's text, got {default!r}")
    if isinstance(default, int):
        if not 0 <= default < len(templates):
            raise ValueError(f"{source}: default index {default} is outside 0..{len(templates) - 1}")
        return default
    if isinstance(default, str):
        if default not in templates:
            raise ValueError(f"{source}: default {default!r} is not one of the templates")
        return list(templates).index(default)
    raise ValueError(f"{source}: default must be a template index or a template's text, got {default!r}")


def rank_aurocs(scores: Tensor, labels: Tensor) -> Tensor:
    """AUROC (float64) of every column of ``scores`` (N × P) against 0/1 ``labels`` (N), ties counted as half.

    The Mann–Whitney form: (sum of the anomalies' average ranks − n₁(n₁+1)/2) / (n₁ n₀), all columns at once.
    """
    from scipy.stats import rankdata

    positive = as_labels(labels, "prompt AUROC").reshape(-1).cpu().numpy()
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise MissingClassError(f"prompt AUROC is undefined: no {'anomalous' if n_pos == 0 else 'normal'} sample")
    values = scores.detach().double().cpu().numpy()
    if values.ndim != 2 or values.shape[0] != positive.size:
        raise ValueError(f"prompt AUROC: scores must be N × P with N = {positive.size} labels, "
                         f"got {tuple(values.shape)}")
    if not np.isfinite(values).all():
        raise ValueError("prompt AUROC: scores contain NaN or inf")
    ranks = rankdata(values, axis=0, method="average")
    return torch.from_numpy((ranks[positive].sum(axis=0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def prompt_aurocs(image_features: Tensor, labels: Tensor, text_features_normal: Tensor,
                  text_features_anom: Tensor, logit_scale: float | Tensor) -> Tensor:
    """AUROC (P, float64) of each of P prompt pairs on one labelled set.

    ``image_features`` N × D (computed once for the set), ``text_features_normal`` / ``text_features_anom`` P × D
    (one row per pair), ``labels`` N in {0, 1}. The score of pair p is the softmax probability of its anomalous
    prompt (:func:`~anomgen.detectors.clip_zero_shot.anomaly_probabilities`), computed for all pairs at once.
    """
    if text_features_normal.dim() != 2:
        raise ValueError(f"prompt_aurocs: text features must be P × D, got {tuple(text_features_normal.shape)}")
    scores = anomaly_probabilities(image_features, text_features_normal, text_features_anom, logit_scale)
    return rank_aurocs(scores, labels)


def _table(name: str, table: Mapping, tasks: list, num_prompts: int) -> dict[object, np.ndarray]:
    """``{task: float64 array of P AUROCs}``, checked against the tasks and the prompt count."""
    if set(table) != set(tasks):
        missing = [t for t in tasks if t not in table]
        extra = [t for t in table if t not in tasks]
        raise ValueError(f"select_prompts: {name} AUROCs must cover the tasks of the real ones; "
                         f"missing: {missing}, extra: {extra}")
    out = {}
    for task in tasks:
        values = table[task]
        row = np.asarray(values.detach().double().cpu() if isinstance(values, Tensor) else values,
                         dtype=np.float64).reshape(-1)
        if row.size != num_prompts:
            raise ValueError(f"select_prompts: {name} AUROCs of task {task!r} have {row.size} prompts, "
                             f"expected {num_prompts}")
        if row.size == 0 or not np.isfinite(row).all():
            raise ValueError(f"select_prompts: {name} AUROCs of task {task!r} must be finite and non-empty")
        out[task] = row
    return out


def select_prompts(real: Mapping, synthetic: Mapping, other_dataset: Mapping | None = None,
                   default_index: int = 0, seed: int = 0) -> dict[str, dict]:
    """Pick one prompt per task by each strategy and score the picks against the real AUROCs.

    ``real``, ``synthetic`` and ``other_dataset`` map each task to the AUROC of every prompt (P values, the same
    prompt order everywhere): on real test data, on the synthetic validation set, and with another dataset's images
    as anomalies. Returns ``{strategy: {"chosen": {task: index} or None, "match_rate", "auroc"}}`` where
    ``match_rate`` is the fraction of tasks whose pick has the task's best real AUROC (a tie with the best counts as a
    match) and ``auroc`` is the mean real AUROC of the picks. Strategies, in order:

    - ``synthetic``: the best synthetic AUROC; ``other_dataset`` (only when given): the best AUROC against the other
      dataset. Ties go to the lowest index.
    - ``random``: the exact expectation over a uniform choice per task (``chosen`` is None);
      ``random_draw``: one uniform draw per task with ``seed`` (its entry also holds ``seed``).
    - ``default``: the prompt ``default_index`` everywhere.
    - ``global_best`` (oracle): the one prompt with the best mean real AUROC over tasks, everywhere.
    - ``best`` / ``worst`` (oracles): each task's best / worst real prompt.
    """
    tasks = list(real)
    if not tasks:
        raise ValueError("select_prompts: no tasks")
    num_prompts = torch.as_tensor(real[tasks[0]]).numel()
    real_t = _table("real", real, tasks, num_prompts)
    if not 0 <= default_index < num_prompts:
        raise ValueError(f"select_prompts: default_index {default_index} is outside 0..{num_prompts - 1}")
    real_best = {t: real_t[t].max() for t in tasks}

    def summary(chosen: dict) -> dict:
        return {
            "chosen": chosen,
            "match_rate": float(np.mean([real_t[t][chosen[t]] == real_best[t] for t in tasks])),
            "auroc": float(np.mean([real_t[t][chosen[t]] for t in tasks])),
        }

    def argmax_of(table: dict) -> dict:
        return {t: int(np.argmax(table[t])) for t in tasks}

    results = {"synthetic": summary(argmax_of(_table("synthetic", synthetic, tasks, num_prompts)))}
    results["random"] = {
        "chosen": None,
        "match_rate": float(np.mean([np.mean(real_t[t] == real_best[t]) for t in tasks])),
        "auroc": float(np.mean([real_t[t].mean() for t in tasks])),
    }
    draws = np.random.default_rng(seed).integers(num_prompts, size=len(tasks))
    results["random_draw"] = {**summary({t: int(d) for t, d in zip(tasks, draws)}), "seed": seed}
    results["default"] = summary({t: default_index for t in tasks})
    if other_dataset is not None:
        results["other_dataset"] = summary(argmax_of(_table("other_dataset", other_dataset, tasks, num_prompts)))
    global_best = int(np.argmax(np.mean([real_t[t] for t in tasks], axis=0)))
    results["global_best"] = summary({t: global_best for t in tasks})
    results["best"] = summary(argmax_of(real_t))
    results["worst"] = summary({t: int(np.argmin(real_t[t])) for t in tasks})
    return results


def render_prompt_table(results_by_benchmark: Mapping[str, Mapping[str, Mapping]]) -> str:
    """Markdown table: one row per strategy, per benchmark (e.g. one-vs-rest, one-vs-one average, one-vs-one
    closest) the match rate with the real best prompt (%) and the mean real AUROC of the picks."""
    if not results_by_benchmark:
        raise ValueError("render_prompt_table: no benchmark results")
    benchmarks = list(results_by_benchmark)
    present = {s for results in results_by_benchmark.values() for s in results}
    strategies = [s for s in STRATEGY_LABELS if s in present] + sorted(present - set(STRATEGY_LABELS))

    def cells(result: Mapping | None) -> list[str]:
        return ["–", "–"] if result is None else [f"{100 * result['match_rate']:.1f}", f"{result['auroc']:.3f}"]

    def label(strategy: str) -> str:
        """The row label; a random draw names its seed when every benchmark used the same one."""
        seeds = {results[strategy].get("seed") for results in results_by_benchmark.values() if strategy in results}
        text = STRATEGY_LABELS.get(strategy, strategy)
        if len(seeds) == 1 and None not in seeds:
            text = text.replace("seeded draw", f"draw, seed {seeds.pop()}")
        return text

    header = ["strategy"] + [f"{b} {what}" for b in benchmarks for what in ("match %", "AUROC")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for strategy in strategies:
        row = [label(strategy)]
        for b in benchmarks:
            row += cells(results_by_benchmark[b].get(strategy))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- running over tasks

#: the benchmarks of prompt selection, as in model selection
PROMPT_BENCHMARKS = ("image_AUROC", "image_AUROC_one_vs_one_mean", "image_AUROC_one_vs_one_closest")


def prompt_class_name(name: str) -> str:
    """A class or category id as prompt text: ``"001.Black_footed_Albatross"`` -> ``"black footed albatross"``,
    ``"metal_nut"`` -> ``"metal nut"``."""
    head, dot, tail = str(name).partition(".")
    text = tail if dot and head.isdigit() else str(name)
    return " ".join(text.replace("_", " ").split()).lower()


def _labels_and_defects(dataset) -> tuple[Tensor, list[str]]:
    from anomgen.selection.features import dataset_entries

    entries = dataset_entries(dataset)
    if entries is None:
        raise TypeError(f"{type(dataset).__name__} has no entries; prompt selection needs labelled record datasets")
    return torch.tensor([e.label for e in entries]), [e.defect_type for e in entries]


def real_prompt_aurocs(features: Tensor, dataset, normal: Tensor, anomalous: Tensor, logit_scale) -> dict:
    """``{benchmark: AUROC per prompt}`` on a labelled test split: one-vs-rest, and the mean and minimum over
    out-classes (anomaly ``defect_type``) of the one-vs-one AUROCs."""
    labels, defects = _labels_and_defects(dataset)
    out = {"image_AUROC": prompt_aurocs(features, labels, normal, anomalous, logit_scale)}
    per_class = []
    for d in dict.fromkeys(d for d, y in zip(defects, labels.tolist()) if y == 1):
        keep = torch.tensor([y == 0 or t == d for t, y in zip(defects, labels.tolist())])
        per_class.append(prompt_aurocs(features[keep], labels[keep], normal, anomalous, logit_scale))
    stacked = torch.stack(per_class) if per_class else out["image_AUROC"].unsqueeze(0)
    out["image_AUROC_one_vs_one_mean"] = stacked.mean(0)
    out["image_AUROC_one_vs_one_closest"] = stacked.min(0).values
    return out


def run_prompt_selection(clip, pool: PromptPool, tasks: Sequence, cache, synthetic_set: str = "diffstyle",
                         other_set: str | None = None, seed: int = 0, batch_size: int = 256) -> dict:
    """Prompt selection over ``tasks`` (objects with ``name``, ``test_set`` and ``validation_sets``, e.g.
    :class:`~anomgen.selection.model_selection.SelectionTask`; the task name is the normal class).

    Image embeddings come from ``cache`` (a :class:`~anomgen.selection.features.FeatureCache`, so each image is
    embedded once), text embeddings once per prompt. Returns ``{"per_task": {task: {"real": {benchmark: [P]},
    "synthetic": [P], "other_dataset": [P]}}, "results": {benchmark: select_prompts(...)}, "table": markdown}``.
    """
    encoder = clip.image_encoder
    real: dict = {b: {} for b in PROMPT_BENCHMARKS}
    synthetic, other, per_task = {}, {}, {}
    for task in tasks:
        pairs = pool.pairs(prompt_class_name(task.name))
        normal = clip.encode_texts([p[0] for p in pairs]).cpu()
        anomalous = clip.encode_texts([p[1] for p in pairs]).cpu()
        test_features = cache.features(f"clip:{clip.model_name}", encoder, task.test_set, batch_size)
        task_real = real_prompt_aurocs(test_features, task.test_set, normal, anomalous, clip.logit_scale)
        for b in PROMPT_BENCHMARKS:
            real[b][task.name] = task_real[b]
        entry = {"real": {b: v.tolist() for b, v in task_real.items()}}
        for key, set_name, table in (("synthetic", synthetic_set, synthetic), ("other_dataset", other_set, other)):
            if set_name is None:
                continue
            if set_name not in task.validation_sets:
                raise KeyError(f"prompt selection: task {task.name!r} has no validation set {set_name!r} (it has "
                               f"{', '.join(task.validation_sets)})")
            dataset = task.validation_sets[set_name]
            labels, _ = _labels_and_defects(dataset)
            feats = cache.features(f"clip:{clip.model_name}", encoder, dataset, batch_size)
            table[task.name] = prompt_aurocs(feats, labels, normal, anomalous, clip.logit_scale)
            entry[key] = table[task.name].tolist()
        per_task[task.name] = entry
    results = {b: select_prompts(real[b], synthetic, other or None, pool.default_index, seed)
               for b in PROMPT_BENCHMARKS}
    return {"pool": pool.name, "templates": list(pool.templates), "per_task": per_task, "results": results,
            "table": render_prompt_table(results)}
