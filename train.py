"""Fit a model and, where the model generates, export its synthetic set.

    python train.py                                  # the default job (see the README)
    python train.py experiment=digits_noise_patch
    python train.py model=noise_patch datamodule=mvtec trainer=ddp trainer.devices=4

The run directory (logs/train/runs/<time>) gets the config, checkpoints, the synthetic set, image grids and
``metrics.json``; its path is the last line printed.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("ANOMGEN_ROOT", str(Path(__file__).resolve().parent))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from anomgen.runtime import (  # noqa: E402
    code_version,
    finish_loggers,
    instantiate_group,
    record_run,
    register_resolvers,
    write_metrics,
)  # noqa: E402

register_resolvers()


def train(cfg: DictConfig) -> tuple[dict, Path, bool]:
    """Fit, then generate and export. Returns (final metrics, run directory, whether this is rank 0)."""
    import lightning as L

    from callbacks.export import SyntheticSetExport

    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)
    datamodule = hydra.utils.instantiate(cfg.datamodule)
    model = hydra.utils.instantiate(cfg.model)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    config = OmegaConf.to_container(cfg, resolve=True)
    version = code_version()
    for logger in loggers:
        logger.log_hyperparams(config)

    metrics: dict = {}
    given_set = cfg.get("outlier_exposure_set")
    # outlier exposure on a set made before: the generative model is neither fitted nor run
    synthetic_set = _existing_set(given_set, cfg) if given_set else None
    fitted = bool(cfg.fit and getattr(model, "trainable", True)) and not given_set
    if fitted:
        # a Lightning checkpoint holds the hyperparameters (optimizer partials, configs), not only tensors, so it is
        # unpickled in full: give ckpt_path only checkpoints you made yourself
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=False)
        metrics.update({k: v for k, v in trainer.callback_metrics.items()})
    if cfg.generate and getattr(model, "generates", False) and not given_set:
        export = next((c for c in callbacks if isinstance(c, SyntheticSetExport)), None)
        if export is None:
            raise ValueError(f"{type(model).__name__} generates, but no SyntheticSetExport callback is configured "
                             "(callbacks.synthetic_set_export); add it or set generate=false")
        export.set_info.update(config=config, task=datamodule.describe(), code_version=version)
        # without fitting, ckpt_path says which weights generate (e.g. export again from a finished run)
        trainer.predict(model, datamodule=datamodule, return_predictions=False,
                        ckpt_path=None if fitted else cfg.get("ckpt_path"), weights_only=False)
        synthetic_set = str(export.dirpath)
        if trainer.is_global_zero:
            from anomgen.data.synthetic import SyntheticSet

            metrics["predict/num_exported"] = len(SyntheticSet(export.dirpath))
    if cfg.get("outlier_exposure") and synthetic_set is not None:
        metrics.update(outlier_exposure(cfg, synthetic_set, run_dir, loggers))
    if cfg.get("compare_detectors") and trainer.is_global_zero:
        summary = compare_detectors(cfg.compare_detectors, datamodule)
        metrics.update(summary)
        log_summary_table(loggers, summary)
    if trainer.is_global_zero:
        write_metrics(run_dir, metrics)
        record_run(cfg.paths.log_dir, run_dir, {"synthetic_set": synthetic_set, "task": cfg.task_name,
                                                "code_version": version})
    finish_loggers(loggers)
    return metrics, run_dir, trainer.is_global_zero


def _existing_set(path: str, cfg: DictConfig) -> str:
    """``outlier_exposure_set=<dir>``: check that it is a finished synthetic set and that there is a stage to run."""
    from anomgen.data.synthetic import SyntheticSet

    if not cfg.get("outlier_exposure"):
        raise ValueError(f"outlier_exposure_set={path} needs an outlier_exposure stage in the config (e.g. "
                         "experiment=animals_nearnd); this config has outlier_exposure: null")
    SyntheticSet(path)  # raises, naming the folder, when it is missing or unfinished
    return str(Path(path).resolve())


def outlier_exposure(cfg: DictConfig, synthetic_set: str, run_dir: Path, loggers: list) -> dict:
    """Fine-tune a detector backbone on the support normals (0) vs the exported anomalies (1): FITYMI's second
    stage. ``cfg.outlier_exposure`` holds ``model`` (e.g. model=vit_oe's config), ``trainer`` and, optionally,
    ``backbone`` (a call that returns the pretrained backbone checkpoint, pretraining it first when it is missing)."""
    oe = cfg.outlier_exposure
    if oe.get("backbone"):
        hydra.utils.instantiate(oe.backbone)
    datamodule = hydra.utils.instantiate(cfg.datamodule, outlier_exposure_set=synthetic_set,
                                         outlier_exposure_target=oe.get("target"), batch_size=oe.batch_size)
    model = hydra.utils.instantiate(oe.model)
    trainer = hydra.utils.instantiate(oe.trainer, default_root_dir=str(run_dir / "oe"), logger=loggers or False)
    trainer.fit(model, datamodule=datamodule)
    return {f"oe/{k}": v for k, v in trainer.callback_metrics.items()}


def compare_detectors(detectors: DictConfig, datamodule) -> dict:
    """Fit each detector's bank on every normal training image, score the real test split: ``summary/<name>/...``
    (image AUROC one-vs-rest, one-vs-one mean and closest)."""
    from torch.utils.data import DataLoader

    from anomgen.selection import image_metrics, score_dataset

    datamodule.setup("test")
    out = {}
    for name, detector_cfg in detectors.items():
        detector = hydra.utils.instantiate(detector_cfg)
        detector.fit(DataLoader(datamodule.train_normals, batch_size=datamodule.eval_batch_size))
        real, _ = image_metrics(*score_dataset(detector, datamodule.test_set, datamodule.eval_batch_size))
        for key in ("image_AUROC", "image_AUROC_one_vs_one_mean", "image_AUROC_one_vs_one_closest"):
            out[f"summary/{name}/{key}"] = real[key]
    return out


def log_summary_table(loggers: list, summary: dict) -> None:
    """The detector comparison as one table (W&B) or as scalars (other loggers)."""
    rows: dict[str, dict] = {}
    for key, value in summary.items():
        _, name, metric = key.split("/", 2)
        rows.setdefault(name, {})[metric] = float(value)
    columns = ["detector", *dict.fromkeys(m for r in rows.values() for m in r)]
    data = [[name, *(r.get(c) for c in columns[1:])] for name, r in rows.items()]
    for logger in loggers:
        if hasattr(logger, "log_table"):
            logger.log_table(key="summary/auroc", columns=columns, data=data)
        else:
            logger.log_metrics({k: float(v) for k, v in summary.items()})


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    metrics, run_dir, is_rank_zero = train(cfg)
    if is_rank_zero:
        for key, value in sorted(metrics.items()):
            print(f"{key}: {float(value):.4f}" if hasattr(value, "__float__") else f"{key}: {value}")
        print(run_dir)


if __name__ == "__main__":
    main()
