"""Score a detector on the real test split and on a synthetic validation set; write the report.

    python evaluate.py                                   # kNN on raw pixels; the last train.py run's synthetic set
    python evaluate.py experiment=digits_noise_patch synthetic_set=/path/to/set

The detector is fitted on the support set (the normal training images). "Real" figures come from the test split;
"synthetic" figures from the held-out normals (never the test split) against the synthetic anomalies. The run
directory gets ``metrics.json`` (flat keys such as ``test/image_AUROC``, ``synthetic/image_AUROC``), ``report.md``
and ``report.json``; its path is the last line printed.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

os.environ.setdefault("ANOMGEN_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from anomgen.runtime import (  # noqa: E402
    finish_loggers,
    instantiate_group,
    register_resolvers,
    write_json,
    write_metrics,
)

register_resolvers()


def synthetic_validation(datamodule, synthetic_set: str):
    """Held-out real normals (label 0) + the synthetic set's anomalies (label 1)."""
    from torch.utils.data import ConcatDataset

    from anomgen.data.synthetic import SyntheticSet

    anomalies = SyntheticSet(synthetic_set, image_size=datamodule.support[0]["image"].shape[-2:], labels=(1,))
    task = anomalies.info.get("task") or {}
    if task.get("normal_class") not in (None, datamodule.normal_class):
        warnings.warn(f"synthetic set {synthetic_set} was made for normal class {task.get('normal_class')!r}, "
                      f"the datamodule's normal class is {datamodule.normal_class!r}", stacklevel=2)
    if len(datamodule.val_normals) == 0:
        raise ValueError("synthetic validation needs held-out normal images: set datamodule.validation=holdout "
                         "(or synthetic) with datamodule.holdout_fraction > 0; the test split is never used for it")
    return ConcatDataset([datamodule.val_normals, anomalies]), anomalies


def filter_by_quality(cfg: DictConfig, datamodule) -> Path:
    """Score the synthetic set's anomalies (``cfg.quality``: EAP by default) and keep the best as a new set."""
    from anomgen.quality.set_scoring import score_set, select_top

    q = hydra.utils.instantiate(cfg.quality)
    score_set(cfg.synthetic_set, q.scorer, q.extractor, datamodule.support, q.labelled_anomalies, key=q.key)
    out = Path(cfg.paths.output_dir) / f"synthetic_set_{q.key}_top"
    return select_top(cfg.synthetic_set, out, q.key, q.keep_fraction)


def evaluate(cfg: DictConfig) -> tuple[dict, Path]:
    import lightning as L

    from anomgen.selection import image_metrics, score_dataset

    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)
    if cfg.get("selection"):
        return evaluate_selection(cfg, run_dir)
    datamodule = hydra.utils.instantiate(cfg.datamodule)
    datamodule.setup("test")
    detector = hydra.utils.instantiate(cfg.detector)
    detector.fit(datamodule.support_dataloader())

    report: dict = {"detector": cfg.detector.get("name", cfg.detector._target_), "task": datamodule.describe()}
    metrics: dict = {}
    real, per_class = image_metrics(*score_dataset(detector, datamodule.test_set, datamodule.eval_batch_size))
    metrics["test"] = real
    report["test_per_out_class"] = per_class
    if cfg.get("synthetic_set"):
        dataset, anomalies = synthetic_validation(datamodule, cfg.synthetic_set)
        synth, synth_per_class = image_metrics(*score_dataset(detector, dataset, datamodule.eval_batch_size))
        metrics["synthetic"] = {**synth, "num_anomalies": len(anomalies), "num_normals": len(datamodule.val_normals)}
        report["synthetic_set"] = str(cfg.synthetic_set)
        report["synthetic_per_out_class"] = synth_per_class
        if cfg.get("quality"):
            top_dir = filter_by_quality(cfg, datamodule)
            dataset, top = synthetic_validation(datamodule, top_dir)
            top_metrics, _ = image_metrics(*score_dataset(detector, dataset, datamodule.eval_batch_size))
            metrics[f"synthetic_{cfg.quality.key}_top"] = {**top_metrics, "num_anomalies": len(top)}
            report["selected_set"] = str(top_dir)
    else:
        report["synthetic_set"] = None

    flat = write_metrics(run_dir, metrics)
    report["metrics"] = metrics
    write_json(run_dir / "report.json", report)
    (run_dir / "report.md").write_text(render_report(report))
    loggers = instantiate_group(cfg.get("logger"))
    # what evaluation uses (train-only groups that shared experiment files bring along are left out)
    numbers = {k: v for k, v in json.loads(flat.read_text()).items() if isinstance(v, (int, float))}
    for logger in loggers:
        logger.log_hyperparams(used_config(cfg, ("task_name", "tags", "seed", "datamodule", "detector", "quality",
                                                 "synthetic_set", "paths")))
        logger.log_metrics(numbers)
        if hasattr(logger, "log_table"):
            rows = [[k, v] for k, v in sorted(per_class.items())]
            logger.log_table(key="test/auroc_per_out_class", columns=["out_class", "AUROC"], data=rows)
    finish_loggers(loggers)
    return metrics, run_dir


def used_config(cfg: DictConfig, keys) -> dict:
    """The top-level ``keys`` of ``cfg``, each resolved against the whole config (train-only groups that shared
    experiment files bring along are left out and never resolved)."""
    from omegaconf import Container

    out = {}
    for key in keys:
        node = cfg.get(key)
        out[key] = OmegaConf.to_container(node, resolve=True) if isinstance(node, Container) else node
    return out


def evaluate_selection(cfg: DictConfig, run_dir: Path) -> tuple[dict, Path]:
    """Synthetic validation for selection (``cfg.selection``): for every normal class in ``selection.tasks`` build
    the validation sets (DiffStyle and baselines, sharing the held-out normals), then

    - model selection (``selection.candidates``): score every candidate detector on them and on the real test split
      and report how well synthetic AUROC ranks the candidates;
    - prompt selection (``selection.prompts``): pick a CLIP prompt per task by synthetic AUROC and compare with the
      baselines (the paper's Tables 1 and 2).

    Writes ``selection/`` (markdown, JSON, real-vs-synthetic scatter plots, image grids of each set)."""
    from anomgen.selection.features import FeatureCache
    from anomgen.selection.validation_sets import selection_task

    sel = cfg.selection
    out_dir = run_dir / "selection"
    builders = {name: hydra.utils.instantiate(b) for name, b in sel.validation_sets.items()}
    tasks = []
    for name, datamodule in selection_datamodules(cfg):
        datamodule.setup("test")
        tasks.append(selection_task(name, datamodule.support, datamodule.test_set, builders,
                                    Path(sel.sets_dir) / name, **sel.split,
                                    info={"dataset": datamodule.describe()["dataset"]}))
    cache = FeatureCache(sel.get("cache_dir"))
    metrics: dict = {"selection/num_tasks": len(tasks)}
    files = save_set_grids(tasks[0], out_dir)
    if sel.get("candidates"):
        metrics.update(model_selection(sel, tasks, cache, out_dir, files, cfg.datamodule.eval_batch_size))
    if sel.get("prompts"):
        metrics.update(prompt_selection(sel.prompts, tasks, cache, out_dir, files, cfg.seed))
    flat = write_metrics(run_dir, metrics)
    report = {"task_name": cfg.task_name, "files": {k: str(v) for k, v in files.items()},
              "feature_cache": cache.stats()}
    write_json(run_dir / "report.json", report)
    numbers = {k: v for k, v in json.loads(flat.read_text()).items() if isinstance(v, (int, float))}
    loggers = instantiate_group(cfg.get("logger"))
    for logger in loggers:
        logger.log_hyperparams(used_config(cfg, ("task_name", "tags", "seed", "datamodule", "selection")))
        logger.log_metrics(numbers)
        log_selection_media(logger, files)
    finish_loggers(loggers)
    return {"selection": {k.removeprefix("selection/"): v for k, v in numbers.items()}}, run_dir


def selection_datamodules(cfg: DictConfig):
    """``(task name, datamodule)`` for every task of ``selection.tasks``: normal classes (one-vs-rest protocol) or
    categories (defects protocol); ``all`` takes every class / category the dataset has."""
    tasks = cfg.selection.tasks
    if tasks == "all":
        dataset = hydra.utils.instantiate(cfg.datamodule.dataset)(split="train")
        tasks = (dataset.available_categories if cfg.datamodule.protocol == "defects"
                 else list(dict.fromkeys(e.category for e in dataset.entries)))  # the classes it has images of
    for task in tasks:
        if cfg.datamodule.protocol == "defects":
            yield str(task), hydra.utils.instantiate(cfg.datamodule, dataset={"category": task})
        else:
            yield str(task), hydra.utils.instantiate(cfg.datamodule, normal_class=task)


def model_selection(sel: DictConfig, tasks: list, cache, out_dir: Path, files: dict, batch_size: int) -> dict:
    """Candidates × tasks × validation sets; ``selection/<set>/K<k>/<benchmark>/...`` agreement metrics."""
    from anomgen.selection.model_selection import candidates_from_config, select_models
    from anomgen.selection.report import write_selection_report

    extractors = {name: hydra.utils.instantiate(e) for name, e in sel.extractors.items()}
    candidates = candidates_from_config(OmegaConf.to_container(sel.candidates, resolve=True))
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


def log_selection_media(logger, files: dict) -> None:
    """W&B: the real-vs-synthetic plots, the set grids and the mean real AUROC per candidate as a table."""
    if not hasattr(logger, "log_image"):
        return
    for key, path in files.items():
        if str(path).endswith(".png"):
            logger.log_image(key=f"selection/{Path(key).stem}", images=[str(path)])
    table = files.get("selection.json")
    if table and hasattr(logger, "log_table"):
        data = json.loads(Path(table).read_text())["summary"]["mean_real"]
        rows = [[c, *(data[key][c] for key in data)] for c in next(iter(data.values()))]
        logger.log_table(key="selection/mean_real_auroc", columns=["candidate", *data], data=rows)


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
    lines = [f"# Evaluation of `{report['detector']}`", ""]
    task = report["task"]
    lines += [f"Task: {task['dataset']} ({task['protocol']}), normal class `{task['normal_class']}`, "
              f"support set {task['support_size']} images.", ""]
    columns = list(report["metrics"])  # test, synthetic, synthetic_<key>_top ...
    lines += ["| metric | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]

    def fmt(values: dict, key: str) -> str:
        value = values.get(key, "–")
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    keys = dict.fromkeys(k for values in report["metrics"].values() for k in values if k != "closest_out_class")
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(fmt(report["metrics"][c], key) for c in columns) + " |")
    lines += ["", f"Closest out-class (real): `{report['metrics']['test'].get('closest_out_class')}`", ""]
    lines += ["## Real AUROC per out-class", "", "| out-class | AUROC |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in sorted(report["test_per_out_class"].items())]
    lines += ["", f"Synthetic set: `{report['synthetic_set']}`"]
    if report.get("selected_set"):
        lines += [f"Kept by quality score: `{report['selected_set']}`"]
    return "\n".join(lines) + "\n"


@hydra.main(version_base="1.3", config_path="configs", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    metrics, run_dir = evaluate(cfg)
    for split, values in metrics.items():
        for key, value in values.items():
            print(f"{split}/{key}: {value:.4f}" if isinstance(value, float) else f"{split}/{key}: {value}")
    print(run_dir)


if __name__ == "__main__":
    main()
