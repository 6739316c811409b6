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
    cfg_used = OmegaConf.masked_copy(cfg, ["task_name", "tags", "seed", "datamodule", "detector", "quality",
                                           "synthetic_set", "paths"])
    numbers = {k: v for k, v in json.loads(flat.read_text()).items() if isinstance(v, (int, float))}
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg_used, resolve=True))
        logger.log_metrics(numbers)
        if hasattr(logger, "log_table"):
            rows = [[k, v] for k, v in sorted(per_class.items())]
            logger.log_table(key="test/auroc_per_out_class", columns=["out_class", "AUROC"], data=rows)
    finish_loggers(loggers)
    return metrics, run_dir


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
