"""Score detectors on the real test split and on synthetic validation sets; write the report. It only scores.

    python evaluate.py                     # the default job's detectors on the last train.py run (README)
    python evaluate.py experiment=noise_patch_digits synthetic_sets.synthetic=/path/to/set
    python evaluate.py detector=knn_pixels +detectors.k5={...}

Every detector (``detector`` and the named ``detectors``) is fitted on the support set (the normal training
images). "Real" figures come from the test split; the figures of each set in ``synthetic_sets`` (name -> folder) from
the held-out normals (never the test split) against that set's anomalies. The run directory gets ``metrics.json``
(flat keys ``<source>/<detector>/<metric>``, e.g. ``test/knn_pixels/image_AUROC``,
``synthetic/knn_pixels/image_AUROC``), ``report.md``, ``report.json`` and ``run.json``; its path is the last line
printed.

A synthetic set is checked against the task it was made for (its set.json ``task``: the dataset, its root and
category, the normal class). An entry written as ``${output:...}`` (the default ``synthetic_sets.synthetic``: the set
the last train.py run exported, whatever its experiment; or a pipeline's earlier stage) whose set was made for
another task is an error naming the folder, what it was made for and what the datamodule is, so that a set of
another experiment is never scored by accident. A folder named explicitly (``synthetic_sets.<name>=<folder>`` on the
command line, or a folder written in an experiment file) is scored anyway, with a warning.

A detector with anomaly maps (``score_maps``; WinCLIP's ``predict`` gives scores and maps in one pass) also gets pixel
metrics on a test split with masks (MVTec AD, VisA): ``test/<detector>/pixel_AUROC``, ``pixel_AP``, ``pixel_F1Max``,
``pixel_F1Max_threshold`` and ``pixel_AUPRO`` (FPR up to ``pixel_metrics.fpr_limit``, 0.3). They are binned over the
detector's ``map_range`` (memory bounded, ``pixel_metrics``) or exact; without any anomalous pixel they are null in
metrics.json with ``pixel_undefined`` saying why. Synthetic sets get image metrics only.

``generation_metrics`` (AnomalyDiffusion's pipeline sets it) adds the generation figures of the named sets:
``generation/<set>/inception_score`` (``pretrained.is_classifier``) and ``generation/<set>/ic_lpips`` (and per defect
type; ``pretrained.lpips``), against the real anomalies the generator learnt from (``datamodule.anomaly_train``).

The project's own errors (:mod:`anomgen.errors`) end the run with one ``error: ...`` message on stderr and exit code 1;
``ANOMGEN_TRACEBACK=1`` (or ``HYDRA_FULL_ERROR=1``) shows their traceback.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("ANOMGEN_ROOT", str(ROOT))
if str(ROOT) not in sys.path:  # models/, callbacks/, datamodules/ are folders of the repository, not installed
    sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from anomgen import pipeline  # noqa: E402
from anomgen.errors import ConfigError  # noqa: E402
from anomgen.files import write_json  # noqa: E402
from anomgen.runtime import (  # noqa: E402
    EVALUATE_GROUPS,
    finish_loggers,
    instantiate_group,
    report_errors,
    tidy_lightning_logging,
    used_config,
    validate_config,
    with_config_paths,
    write_metrics,
)

pipeline.register_resolvers()
log = logging.getLogger("anomgen")


#: what a synthetic set was made for (its set.json ``task``) that must match the datamodule: the dataset, its root and
#: category (``dataset_kwargs``) and the normal class
TASK_IDENTITY = ("dataset", "root", "category", "normal_class")
#: a ``synthetic_sets`` entry written as ``${output:...}``: a set found through a run's record, not named by the user
_FROM_A_RUN = re.compile(r"\$\{\s*output\s*:")


def task_identity(task: dict) -> dict:
    """The :data:`TASK_IDENTITY` fields of a ``describe()`` task (a set's or the datamodule's); the ones it does not
    record are left out."""
    kwargs = task.get("dataset_kwargs") or {}
    out = {key: task[key] for key in ("dataset", "normal_class") if key in task}
    out.update({key: str(kwargs[key]) for key in ("root", "category") if kwargs.get(key) is not None})
    if "root" in out:
        out["root"] = str(Path(out["root"]).expanduser().resolve())
    if out.get("normal_class") is not None:
        out["normal_class"] = str(out["normal_class"])
    return out


def task_mismatch(made_for: dict, task: dict) -> list[str]:
    """The :data:`TASK_IDENTITY` fields in which the task a set was made for (its set.json ``task``) differs from the
    datamodule's (``task``: ``datamodule.describe()``); empty when the set records no task."""
    if not made_for:
        return []
    made, now = task_identity(made_for), task_identity(task)
    return [key for key in TASK_IDENTITY if (key in made or key in now) and made.get(key) != now.get(key)]


def _described(identity: dict) -> str:
    return ", ".join(f"{key}={identity.get(key)!r}" for key in TASK_IDENTITY if key in identity)


def synthetic_validation(datamodule, synthetic_set: str, name: str = "synthetic", strict: bool = False):
    """Held-out real normals (label 0) + the synthetic set's anomalies (label 1).

    A set made for another task (its set.json ``task``: another dataset, root, category or normal class than the
    datamodule's) is a :class:`~anomgen.errors.ConfigError` with ``strict`` (a set found through a run's record,
    ``${output:...}``) and a warning without (a set the user named)."""
    from torch.utils.data import ConcatDataset

    from anomgen.data.synthetic import SyntheticSet

    anomalies = SyntheticSet(synthetic_set, image_size=datamodule.support[0]["image"].shape[-2:], labels=(1,))
    made_for, task = anomalies.info.get("task") or {}, datamodule.describe()
    differ = task_mismatch(made_for, task)
    if differ:
        what = (f"synthetic set {synthetic_set} (synthetic_sets.{name}) was made for "
                f"{_described(task_identity(made_for))}; the datamodule is {_described(task_identity(task))} "
                f"(they differ in {', '.join(differ)})")
        if strict:
            raise ConfigError(f"{what}. The set was found through ${{output:...}} (what a train.py run or an earlier "
                              f"stage recorded), not named by you: evaluate it with the datamodule it was made for, "
                              f"name it to score it anyway (synthetic_sets.{name}={synthetic_set}), or leave it out "
                              f"(synthetic_sets.{name}=null)")
        warnings.warn(f"{what}; scored because it was named explicitly", stacklevel=2)
    if len(datamodule.val_normals) == 0:
        raise ConfigError("synthetic validation needs held-out normal images: set datamodule.validation=holdout "
                         "(or synthetic) with datamodule.holdout_fraction > 0; the test split is never used for it")
    return ConcatDataset([datamodule.val_normals, anomalies]), anomalies


def synthetic_sets_of(cfg: DictConfig) -> dict[str, tuple[str, bool]]:
    """``synthetic_sets`` as {name: (folder, from a run)}: ``from a run`` when the entry is written as an
    ``${output:...}`` interpolation (the set a train.py run or an earlier stage recorded, e.g. the default
    ``${output:synthetic_set,null}``), not a folder the user named; entries that resolve to null are left out."""
    sets = cfg.get("synthetic_sets") or {}
    written = OmegaConf.to_container(sets, resolve=False) if OmegaConf.is_config(sets) else dict(sets)
    return {str(name): (str(path), bool(_FROM_A_RUN.search(str(written.get(name, "")))))
            for name, path in sets.items() if path}


def named_detectors(cfg: DictConfig) -> dict:
    """``detector`` (under its ``name``) and every entry of ``detectors``, in that order."""
    out = {}
    if cfg.get("detector"):
        out[cfg.detector.get("name") or "detector"] = cfg.detector
    for name, detector in (cfg.get("detectors") or {}).items():
        if detector is not None:
            out[name] = detector
    if not out:
        raise ConfigError("nothing to score: give a detector (detector=knn_pixels) or detectors.<name>={...}")
    return out


def pixel_metrics_for(detector, dataset, cfg: DictConfig | None, name: str):
    """A :class:`~anomgen.selection.PixelMetrics` for ``detector`` on ``dataset`` (the test split), or ``None`` when
    the detector has no maps or the dataset no masks. ``cfg`` (``pixel_metrics``): ``num_thresholds`` (binned mode,
    over ``score_range`` or else the detector's ``map_range``; exact mode when neither is known, or with null) and
    ``fpr_limit``."""
    from anomgen.selection import PixelMetrics, dataset_has_masks, has_anomaly_maps

    if not has_anomaly_maps(detector) or dataset_has_masks(dataset) is False:
        return None
    cfg = cfg or {}
    num_thresholds = cfg.get("num_thresholds")
    score_range = cfg.get("score_range") or getattr(detector, "map_range", None)
    if num_thresholds is None or score_range is None:
        num_thresholds = score_range = None
    else:
        score_range = tuple(float(v) for v in score_range)
    return PixelMetrics(num_thresholds, score_range, fpr_limit=cfg.get("fpr_limit", 0.3), name=name)


def generation_figures(cfg: DictConfig, datamodule, sets: dict[str, str]) -> dict:
    """``generation_metrics``: ``sets`` (names in ``synthetic_sets``), ``inception_score`` and ``ic_lpips`` (bools),
    ``splits``: :func:`anomgen.metrics.generation.generation_metrics` of each named set, its IC-LPIPS clusters centred
    on the datamodule's ``anomaly_train`` (the real anomalies the generator learnt from)."""
    from anomgen.metrics.generation import generation_metrics

    gen = cfg.generation_metrics
    anomalies = getattr(datamodule, "anomaly_train", None)
    if anomalies is None:
        raise ConfigError("generation_metrics compares generated anomalies with the real ones the generator learnt "
                         "from: set datamodule.anomaly_train_fraction (AnomalyDiffusion: 0.3333333333333333)")
    missing = [name for name in gen.sets if name not in sets]
    if missing:
        raise ConfigError(f"generation_metrics.sets names {missing}, not among synthetic_sets {sorted(sets)}")
    classifier = hydra.utils.instantiate(cfg.pretrained.is_classifier) if gen.get("inception_score", True) else None
    distance = hydra.utils.instantiate(cfg.pretrained.lpips) if gen.get("ic_lpips", True) else None
    return {name: generation_metrics(sets[name], anomalies, classifier, distance, splits=int(gen.get("splits", 10)),
                                     seed=int(cfg.seed), batch_size=datamodule.eval_batch_size)
            for name in gen.sets}


@with_config_paths  # weights are also looked for in the config's paths.pretrained_dir
def evaluate(cfg: DictConfig) -> tuple[dict, Path]:
    import lightning as L

    from anomgen.selection import image_metrics, score_dataset

    validate_config(cfg, EVALUATE_GROUPS)  # types, ranges and ??? values: one error naming the key, before any work
    tidy_lightning_logging()  # one copy of each line, no adverts
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)
    if cfg.get("selection"):
        return evaluate_selection(cfg, run_dir)
    datamodule = hydra.utils.instantiate(cfg.datamodule)
    datamodule.setup("test")
    found = synthetic_sets_of(cfg)
    sets = {name: path for name, (path, _) in found.items()}
    validation = {name: synthetic_validation(datamodule, path, name, strict=from_run)
                  for name, (path, from_run) in found.items()}
    batch_size = datamodule.eval_batch_size

    report: dict = {"task": datamodule.describe(), "synthetic_sets": sets, "detectors": {}}
    metrics: dict = {}
    for name, detector_cfg in named_detectors(cfg).items():
        detector = hydra.utils.instantiate(detector_cfg)
        detector.fit(datamodule.support_dataloader())
        pixels = pixel_metrics_for(detector, datamodule.test_set, cfg.get("pixel_metrics"), name)
        real, per_class = image_metrics(*score_dataset(detector, datamodule.test_set, batch_size, pixels=pixels))
        report["detectors"][name] = {"target": detector_cfg.get("_target_"), "test_per_out_class": per_class}
        if pixels is not None and (pixel := pixels.compute()):
            real.update(pixel)
            report["detectors"][name]["test_pixel_metrics"] = pixels.describe()
        metrics.setdefault("test", {})[name] = real
        log.info("%s: test image AUROC %.4f", name, real.get("image_AUROC", float("nan")))
        for set_name, (dataset, anomalies) in validation.items():
            synth, _ = image_metrics(*score_dataset(detector, dataset, batch_size))
            log.info("%s: synthetic set %r image AUROC %.4f", name, set_name, synth.get("image_AUROC", float("nan")))
            metrics.setdefault(set_name, {})[name] = {**synth, "num_anomalies": len(anomalies),
                                                      "num_normals": len(datamodule.val_normals)}

    if cfg.get("generation_metrics"):
        metrics["generation"] = generation_figures(cfg, datamodule, sets)
    flat = write_metrics(run_dir, metrics)
    report["metrics"] = metrics
    write_json(run_dir / "report.json", report)
    (run_dir / "report.md").write_text(render_report(report))
    loggers = instantiate_group(cfg.get("logger"))
    # what evaluation uses (train-only groups that shared experiment files bring along are left out)
    numbers = {k: v for k, v in json.loads(flat.read_text()).items() if isinstance(v, (int, float))}
    for logger in loggers:
        logger.log_hyperparams(used_config(cfg, ("task_name", "tags", "seed", "datamodule", "detector", "detectors",
                                                 "synthetic_sets", "pixel_metrics", "generation_metrics",
                                                 "paths")))
        logger.log_metrics(numbers)
        if hasattr(logger, "log_table"):
            rows = [[d, k, v] for d, r in report["detectors"].items()
                    for k, v in sorted(r["test_per_out_class"].items())]
            logger.log_table(key="test/auroc_per_out_class", columns=["detector", "out_class", "AUROC"], data=rows)
            log_detector_table(logger, metrics)
    finish_loggers(loggers)
    outputs = {"metrics": str(flat.resolve()), "report": str((run_dir / "report.json").resolve())}
    pipeline.write_run_record(run_dir, outputs, {"task": cfg.task_name})
    return metrics, run_dir


#: the pixel metrics of the summary table (when a detector has them)
PIXEL_TABLE_KEYS = ("pixel_AUROC", "pixel_AP", "pixel_F1Max", "pixel_AUPRO")


def log_detector_table(logger, metrics: dict) -> None:
    """The detectors side by side (one row each): image AUROC one-vs-rest, one-vs-one mean and closest, per source;
    then the test split's pixel metrics when a detector has them (empty cells for the others)."""
    keys = ("image_AUROC", "image_AUROC_one_vs_one_mean", "image_AUROC_one_vs_one_closest")
    columns = [(source, k) for source in metrics for k in keys]
    columns += [("test", k) for k in PIXEL_TABLE_KEYS if any(k in values for values in metrics["test"].values())]
    rows = [[name, *(_finite(metrics[source].get(name, {}).get(k)) for source, k in columns)]
            for name in metrics["test"]]
    logger.log_table(key="summary/auroc", columns=["detector", *(f"{s}/{k}" for s, k in columns)], data=rows)


def _finite(value):
    """NaN (an undefined metric) as None, an empty cell."""
    return None if isinstance(value, float) and math.isnan(value) else value


def evaluate_selection(cfg: DictConfig, run_dir: Path) -> tuple[dict, Path]:
    """Synthetic validation for selection (``cfg.selection``) on validation sets made before (``selection.sets``: set
    name -> {task -> run or set folder}, e.g. ``${output:diffstyle.runs}`` of a foreach stage): for every task (the
    datamodule with ``selection.task_key`` set to the task) read its sets (DiffStyle and baselines, sharing the
    held-out normals), then

    - model selection (``selection.candidates``): score every candidate detector on them and on the real test split
      and report how well synthetic AUROC ranks the candidates;
    - prompt selection (``selection.prompts``): pick a CLIP prompt per task by synthetic AUROC and compare with the
      baselines (the paper's Tables 1 and 2).

    Writes ``selection/`` (markdown, JSON, real-vs-synthetic scatter plots, image grids of each set)."""
    from anomgen.selection.features import FeatureCache
    from anomgen.selection.validation_sets import selection_task

    sel = cfg.selection
    out_dir = run_dir / "selection"
    sets = selection_sets(sel.sets)
    tasks = []
    for name, datamodule in selection_datamodules(cfg, list(next(iter(sets.values())))):
        datamodule.setup("test")
        tasks.append(selection_task(name, datamodule.support, datamodule.test_set,
                                    {set_name: by_task[name] for set_name, by_task in sets.items()},
                                    bank_without_sources=sel.bank_without_sources))
    cache = FeatureCache(sel.get("cache_dir"))
    metrics: dict = {"selection/num_tasks": len(tasks)}
    files = save_set_grids(tasks[0], out_dir)
    if sel.get("candidates") or sel.get("extractors"):
        metrics.update(model_selection(sel, tasks, cache, out_dir, files, cfg.datamodule.eval_batch_size))
    if sel.get("prompts"):
        metrics.update(prompt_selection(sel.prompts, tasks, cache, out_dir, files, cfg.seed))
    flat = write_metrics(run_dir, metrics)
    report = {"task_name": cfg.task_name, "files": {k: str(v) for k, v in files.items()},
              "feature_cache": cache.stats(), "sets": sets}
    write_json(run_dir / "report.json", report)
    numbers = {k: v for k, v in json.loads(flat.read_text()).items() if isinstance(v, (int, float))}
    loggers = instantiate_group(cfg.get("logger"))
    for logger in loggers:
        logger.log_hyperparams(used_config(cfg, ("task_name", "tags", "seed", "datamodule", "selection")))
        logger.log_metrics(numbers)
        log_selection_media(logger, files)
    finish_loggers(loggers)
    outputs = {"metrics": str(flat.resolve()), "report": str((run_dir / "report.json").resolve())}
    pipeline.write_run_record(run_dir, outputs, {"task": cfg.task_name})
    return {"selection": {k.removeprefix("selection/"): v for k, v in numbers.items()}}, run_dir


def selection_sets(sets: DictConfig) -> dict[str, dict[str, str]]:
    """``selection.sets`` as {set name: {task: folder}}; every set names the same tasks."""
    resolved = OmegaConf.to_container(sets, resolve=True) if OmegaConf.is_config(sets) else dict(sets or {})
    out = {name: {str(task): str(folder) for task, folder in by_task.items()}
           for name, by_task in resolved.items() if by_task}
    if not out:
        raise ConfigError("selection.sets is empty: give {set name: {task: run or set folder}}, e.g. the runs of the "
                         "pipeline's foreach stages (selection.sets.diffstyle=${output:diffstyle.runs})")
    first = next(iter(out))
    for name, by_task in out.items():
        if set(by_task) != set(out[first]):
            raise ConfigError(f"selection.sets: {name!r} has tasks {list(by_task)}, {first!r} has {list(out[first])}")
    return out


def selection_datamodules(cfg: DictConfig, tasks: list[str]):
    """``(task, datamodule)`` for every task: the datamodule with ``selection.task_key`` (the override key the sets
    were made by, e.g. ``datamodule.normal_class`` or ``datamodule.dataset.category``) set to the task."""
    key = cfg.selection.task_key
    if not key.startswith("datamodule."):
        raise ConfigError(f"selection.task_key must be a datamodule key (datamodule.normal_class, "
                         f"datamodule.dataset.category), got {key!r}")
    for task in tasks:
        datamodule_cfg = OmegaConf.create(OmegaConf.to_container(cfg.datamodule, resolve=True))
        OmegaConf.update(datamodule_cfg, key.removeprefix("datamodule."), task)
        yield task, hydra.utils.instantiate(datamodule_cfg)


def model_selection(sel: DictConfig, tasks: list, cache, out_dir: Path, files: dict, batch_size: int) -> dict:
    """Candidates × tasks × validation sets; ``selection/<set>/K<k>/<benchmark>/...`` agreement metrics."""
    from anomgen.selection.model_selection import candidates_from_config, select_models
    from anomgen.selection.report import write_selection_report

    extractors = {name: hydra.utils.instantiate(e) for name, e in sel.extractors.items()}
    spec = OmegaConf.to_container(sel.candidates, resolve=True) if sel.get("candidates") else \
        {name: {"k": sel.candidate_k} for name in sel.extractors}  # one candidate per extractor
    candidates = candidates_from_config(spec)
    k_values = [None if k in (None, "all") else int(k) for k in sel.k_values]
    result = select_models(tasks, candidates, extractors, cache, k_values, batch_size=batch_size)
    files.update(write_selection_report(result, out_dir))
    metrics = {"selection/num_candidates": len(candidates)}
    for vs, by_k in result.summary["agreement"].items():
        for k, by_key in by_k.items():
            for key, stats in by_key.items():
                prefix = f"selection/{vs}/K{k}/{key}"
                metrics.update({f"{prefix}/spearman_mean": stats["spearman"],
                                f"{prefix}/kendall_mean": stats["kendall"],
                                f"{prefix}/top1_rate": stats["top1_rate"],
                                f"{prefix}/regret_mean": stats["regret"],
                                f"{prefix}/abs_gap_mean": stats["abs_gap"],
                                f"{prefix}/dataset_spearman": stats["dataset"]["spearman"],
                                f"{prefix}/dataset_top1": float(stats["dataset"]["top1_agreement"])})
    return metrics


def prompt_selection(cfg: DictConfig, tasks: list, cache, out_dir: Path, files: dict, seed: int) -> dict:
    """CLIP prompt selection by synthetic AUROC: ``selection/prompts/<benchmark>/<strategy>/{match_rate,auroc}``."""
    from anomgen.files import write_atomic
    from anomgen.selection.prompts import PromptPool, run_prompt_selection

    clip = hydra.utils.instantiate(cfg.model)
    pool = PromptPool.load(cfg.pool)
    out = run_prompt_selection(clip, pool, tasks, cache, cfg.synthetic_set, cfg.get("other_set"), seed)
    files["prompts.md"] = write_atomic(out_dir / "prompts.md",
                                       f"# Prompt selection ({pool.name}, {len(tasks)} tasks)\n\n{out['table']}\n")
    files["prompts.json"] = write_json(out_dir / "prompts.json", out)
    return {f"selection/prompts/{bench}/{strategy}/{key}": float(res[key])
            for bench, by_strategy in out["results"].items() for strategy, res in by_strategy.items()
            for key in ("match_rate", "auroc")}


#: the columns of the ``selection/rank_agreement`` table after set, K and benchmark
AGREEMENT_COLUMNS = ("spearman", "kendall", "top1_rate", "regret", "dataset_spearman", "dataset_top1")


def log_selection_media(logger, files: dict) -> None:
    """W&B: the real-vs-synthetic plots (``selection/scatter_<set>_<benchmark>``), the set grids
    (``selection/grid_<set>``), the mean real AUROC per candidate (``selection/mean_real_auroc``) and the rank
    agreement of synthetic with real AUROC per set, K and benchmark (``selection/rank_agreement``) as tables."""
    if not hasattr(logger, "log_image"):
        return
    for key, path in files.items():
        if str(path).endswith(".png"):
            logger.log_image(key=f"selection/{Path(key).stem}", images=[str(path)])
    table = files.get("selection.json")
    if table and hasattr(logger, "log_table"):
        summary = json.loads(Path(table).read_text())["summary"]
        data = summary["mean_real"]
        rows = [[c, *(data[key][c] for key in data)] for c in next(iter(data.values()))]
        logger.log_table(key="selection/mean_real_auroc", columns=["candidate", *data], data=rows)
        rows = [[vs, str(k), key, stats["spearman"], stats["kendall"], stats["top1_rate"], stats["regret"],
                 stats["dataset"]["spearman"], float(stats["dataset"]["top1_agreement"])]
                for vs, by_k in summary["agreement"].items() for k, by_key in by_k.items()
                for key, stats in by_key.items()]
        logger.log_table(key="selection/rank_agreement", columns=["set", "K", "benchmark", *AGREEMENT_COLUMNS],
                         data=rows)


def save_set_grids(task, out_dir: Path, n: int = 32) -> dict:
    """A PNG grid of the first ``n`` synthetic anomalies of each of ``task``'s validation sets."""
    import torch

    from anomgen.visualize import image_grid, save_png

    files = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, dataset in task.validation_sets.items():
        anomalies = [i for i, e in enumerate(dataset.entries) if e.label == 1][:n]
        if anomalies:
            path = out_dir / f"grid_{task.name}_{name}.png"
            save_png(image_grid(torch.stack([dataset[i]["image"] for i in anomalies]), nrow=8), path)
            files[f"grid_{name}"] = path
    return files


def render_report(report: dict) -> str:
    task = report["task"]
    lines = ["# Evaluation", "", f"Task: {task['dataset']} ({task['protocol']}), normal class "
             f"`{task['normal_class']}`, support set {task['support_size']} images.", ""]
    columns = [(source, name) for source, by_name in report["metrics"].items() for name in by_name]
    lines += ["| metric | " + " | ".join(f"{s} / {n}" for s, n in columns) + " |", "|---" * (len(columns) + 1) + "|"]

    def fmt(values: dict, key: str) -> str:
        value = values.get(key, "–")
        if isinstance(value, float) and math.isnan(value):
            return "undefined"
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    keys = dict.fromkeys(k for by_name in report["metrics"].values() for values in by_name.values() for k in values
                         if k not in ("closest_out_class", "pixel_undefined"))
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(fmt(report["metrics"][s][n], key) for s, n in columns) + " |")
    for name, detector in report["detectors"].items():
        pixel = detector.get("test_pixel_metrics")
        if pixel:
            how = (f"binned, {pixel['num_thresholds']:,} thresholds over {tuple(pixel['score_range'])}"
                   if pixel["mode"] == "binned" else "exact")
            resized = (f"; maps of {tuple(pixel['maps_resized_from'])} resized bilinearly to the masks' size"
                       if pixel["maps_resized_from"] else "")
            lines += ["", f"Pixel metrics of `{name}` (test): {pixel['num_images']} images, {pixel['num_masks']} with "
                      f"a mask file, {pixel['num_anomalous_pixels']:,} of {pixel['num_pixels']:,} pixels anomalous; "
                      f"{how}; AUPRO up to FPR {pixel['fpr_limit']}{resized}."]
            undefined = report["metrics"]["test"][name].get("pixel_undefined")
            if undefined:
                lines.append(f"**Undefined**: {undefined}.")
    for name, detector in report["detectors"].items():
        lines += ["", f"## `{name}`: real AUROC per out-class", "",
                  f"Closest out-class (real): `{report['metrics']['test'][name].get('closest_out_class')}`", "",
                  "| out-class | AUROC |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in sorted(detector["test_per_out_class"].items())]
    lines += [""] + [f"Synthetic set `{name}`: `{path}`" for name, path in report["synthetic_sets"].items()]
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    from anomgen.runtime import flatten

    with report_errors():
        metrics, run_dir = evaluate(cfg)
    for key, value in flatten(metrics).items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    print(run_dir)


if __name__ == "__main__":
    main()
