"""Run one stage, or an experiment's pipeline of stages.

    python train.py                                  # the default job: the FITYMI pipeline on digits (README)
    python train.py model=sde_nearnd trainer.devices=4
    python train.py experiment=noise_patch_digits
    python train.py experiment=fitymi_digits hydra.run.dir=logs/train/runs/<time>   # resume: finished stages skip

A stage is one model, one datamodule, one Trainer: fit (when the model trains; then test, when it has
``tests_after_fit``), then predict + export (when it generates). It records its outputs (checkpoint, synthetic set,
backbone file ...) in ``<run>/run.json``. An experiment with a ``pipeline:`` runs its stages in order, each in
``<run>/<stage>``, a ``foreach`` stage once per value in ``<run>/<stage>/<value>`` (see :mod:`anomgen.pipeline`).
``trainer.devices=N`` (N > 1, no strategy chosen) runs DDP, one process per device (gloo processes on a CPU
machine); asking for more GPUs than the machine has is one error naming ``trainer.devices`` and the count found.
Under DDP only rank 0 writes the run records; in a pipeline every rank waits after each stage until rank 0 has
written its record, and ``evaluate`` stages and stages marked ``rank_zero: true`` (a cached backbone or DDPM, made
the same whatever the device count) run on rank 0 alone, on one device, while the others wait.
Each stage's config is checked before anything is built from it (:func:`anomgen.runtime.validate_config`: no ``???``
left, ``trainer.max_epochs`` an integer, fractions in [0, 1] ...). The run folder is the last line printed. The
project's own errors (:mod:`anomgen.errors`: a missing dataset, a set that exists, missing weights, an inconsistent
config) end the run with one ``error: ...`` message on stderr and exit code 1; ``ANOMGEN_TRACEBACK=1`` (or
``HYDRA_FULL_ERROR=1``) shows their traceback.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
os.environ.setdefault("ANOMGEN_ROOT", str(ROOT))
if str(ROOT) not in sys.path:  # models/, callbacks/, datamodules/ are folders of the repository, not installed
    sys.path.insert(0, str(ROOT))

import hydra  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from anomgen import pipeline  # noqa: E402
from anomgen.distributed import barrier, process_rank, trainer_settings  # noqa: E402
from anomgen.errors import ConfigError  # noqa: E402
from anomgen.files import write_json  # noqa: E402
from anomgen.progress import progress_enabled  # noqa: E402
from anomgen.runtime import (  # noqa: E402
    TRAIN_GROUPS,
    code_version,
    finish_loggers,
    group_choice,
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
CONFIGS = ROOT / "configs"
STAGE_KEYS = {"overrides", "entry", "bare", "dir", "foreach", "rank_zero"}


def train(cfg: DictConfig, overrides: list[str] | None = None) -> tuple[dict, Path, bool]:
    """Run ``cfg``: its pipeline when it has one (``overrides``: the command line, passed on to every stage it
    applies to), else one stage. Returns (final metrics, run directory, whether this is rank 0)."""
    if cfg.get("pipeline"):
        return run_pipeline(cfg, list(overrides or []))
    return run_stage(cfg)


@with_config_paths  # weights are also looked for in the config's paths.pretrained_dir
def run_stage(cfg: DictConfig) -> tuple[dict, Path, bool]:
    """Fit, then generate and export; record the outputs in ``run.json``."""
    import lightning as L

    from callbacks.export import SyntheticSetExport

    validate_config(cfg, TRAIN_GROUPS)  # types, ranges and ??? values: one error naming the key, before anything runs
    tidy_lightning_logging()  # one copy of each line, no adverts
    # more than one device and no strategy: DDP, one process per device (gloo on CPUs); too few GPUs: one error, now
    settings = trainer_settings(cfg.trainer)
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.output_dir)
    datamodule = hydra.utils.instantiate(cfg.datamodule)
    model = hydra.utils.instantiate(cfg.model)
    callbacks = instantiate_group(cfg.get("callbacks"))
    generates = bool(cfg.generate and getattr(model, "generates", False))
    export = next((c for c in callbacks if isinstance(c, SyntheticSetExport)), None)
    if generates and export is None:
        raise ConfigError(f"{type(model).__name__} generates, but no SyntheticSetExport callback is configured "
                         "(callbacks.synthetic_set_export); add it or set generate=false")
    if generates:
        export.check_target()  # an existing set is refused before any training, not after it
    loggers = instantiate_group(cfg.get("logger"))
    try:
        # Lightning's bar (fit, predict: the export) follows the project's switch unless the config sets it
        bar = {} if "enable_progress_bar" in cfg.trainer else {"enable_progress_bar": progress_enabled()}
        trainer = hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **settings, **bar)
        config = used_config(cfg)
        version = code_version()
        for logger in loggers:
            logger.log_hyperparams(config)

        metrics: dict = {}
        outputs: dict = {}
        fitted = bool(cfg.fit and getattr(model, "trainable", True))
        name = type(model).__name__
        if fitted:
            started = time.monotonic()
            # a Lightning checkpoint holds the hyperparameters (optimizer partials, configs), not only tensors, so it is
            # unpickled in full: give ckpt_path only checkpoints you made yourself
            trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=False)
            metrics.update({k: v for k, v in trainer.callback_metrics.items()})
            checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", None)
            found = checkpoint and Path(checkpoint).is_file()
            outputs["checkpoint"] = str(Path(checkpoint).resolve()) if found else None
            if trainer.is_global_zero:
                steps = trainer.global_step
                log.info("%s: fit done in %s (%d step%s)", name, duration(time.monotonic() - started), steps,
                         "" if steps == 1 else "s")
            if getattr(model, "tests_after_fit", False):
                # the model's own test, on the weights it selected while fitting (e.g. the defect-type classifier on the
                # real held-out anomalies; it selected on held-out generated ones, never on the test split)
                trainer.test(model, datamodule=datamodule, verbose=False)
                metrics.update({k: v for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
        if generates:
            export.set_info.update(config=config, task=datamodule.describe(), code_version=version)
            started = time.monotonic()
            # without fitting, ckpt_path says which weights generate (e.g. export again from a finished run)
            trainer.predict(model, datamodule=datamodule, return_predictions=False,
                            ckpt_path=None if fitted else cfg.get("ckpt_path"), weights_only=False)
            if trainer.is_global_zero:
                from anomgen.data.synthetic import SyntheticSet

                metrics["predict/num_exported"] = len(SyntheticSet(export.dirpath))
                log.info("%s: generation done in %s", name, duration(time.monotonic() - started))
        for part in (model, *callbacks):  # what the model and callbacks wrote: a backbone, FID-band sets, a kept set
            outputs.update(getattr(part, "stage_outputs", None) or {})
        if trainer.is_global_zero:
            outputs["metrics"] = str(write_metrics(run_dir, metrics).resolve())
            pipeline.write_run_record(run_dir, outputs, {"task": cfg.task_name, "code_version": version,
                                                         "model": cfg.model.get("_target_")})
            if not cfg.get("pipeline_dir"):
                pipeline.point_latest_run(cfg.paths.log_dir, run_dir)
    except BaseException:
        finish_loggers(loggers, "failed")  # no W&B run left open for the next run of this process
        raise
    finish_loggers(loggers)
    return metrics, run_dir, trainer.is_global_zero


def run_pipeline(cfg: DictConfig, overrides: list[str]) -> tuple[dict, Path, bool]:
    """Run the stages of ``cfg.pipeline`` in order in subfolders of the run folder; skip the finished ones."""
    from omegaconf import open_dict

    run_dir = Path(cfg.paths.output_dir).resolve()
    experiment = group_choice(cfg, "experiment") or cfg.task_name  # before pipeline_dir is set (a stage has none)
    group = f"{experiment}/{run_dir.name}"  # the stages' logger runs: one group per pipeline run, named by stage
    with open_dict(cfg):
        cfg.pipeline_dir = str(run_dir)  # ${output:STAGE.KEY} in the stages' overrides reads this pipeline
    stages = OmegaConf.to_container(cfg.pipeline, resolve=False)  # resolved one stage at a time, when it starts
    # a stage set to null (an experiment's `pipeline: {classifier: null}`, or `pipeline.classifier=null`) is left out
    stages = {name: stage for name, stage in stages.items() if stage is not None}
    bad = [name for name, stage in stages.items() if not isinstance(stage, dict) or set(stage) - STAGE_KEYS
           or stage.get("entry", "train") not in ("train", "evaluate")]
    if bad:
        raise ConfigError(f"pipeline stages {bad}: each stage is {{overrides: [...], entry: train|evaluate, "
                         "bare: true|false, dir: optional folder, foreach: optional {key: ..., values: [...] | all}, "
                         "rank_zero: true|false}}")
    folders = {name: str(Path(cfg.pipeline[name].get("dir") or run_dir / name).resolve()) for name in stages}
    write_json(run_dir / pipeline.PIPELINE_RECORD, {"stages": folders, "order": list(folders)})
    metrics: dict = {}
    records: dict = {}
    for number, (name, stage) in enumerate(stages.items(), start=1):
        folder = Path(folders[name])
        label = f"stage {number}/{len(stages)} {name!r}"
        own = [pipeline.resolve_override(o, cfg) for o in stage.get("overrides") or []]
        named = {**stage, "overrides": own, "run_name": f"{experiment}/{name}", "run_group": group}
        # a stage in a folder shared by pipelines (its `dir`, a cache) is made by one run at a time; under DDP rank 0
        # holds the lock, the other ranks wait for rank 0 inside the stage
        shared = stage.get("dir") is not None and process_rank() == 0
        with pipeline.stage_lock(folder, label) if shared else contextlib.nullcontext():
            if pipeline.stage_done(folder):
                pipeline.check_same_stage(folder, name, own)
                log.info("%s: finished before (%s), skipped", label, folder)
            else:
                pipeline.write_stage_overrides(folder, own)
                if stage.get("foreach") is not None:
                    started = time.monotonic()
                    log.info("%s (foreach): started in %s", label, folder)
                    run_foreach(name, named, cfg, overrides, run_dir, folder, label)
                    log.info("%s: done in %s", label, duration(time.monotonic() - started))
                else:
                    run_announced(label, named, overrides, run_dir, folder)
        records[name] = pipeline.read_run_record(folder) or {}
        metrics_file = records[name].get("outputs", {}).get("metrics")
        if metrics_file and Path(metrics_file).is_file():
            metrics.update({f"{name}/{k}": v for k, v in json.loads(Path(metrics_file).read_text()).items()})
    is_zero = process_rank() == 0
    if is_zero:
        write_metrics(run_dir, metrics)
        pipeline.write_run_record(run_dir, pipeline.pipeline_outputs(records),
                                  {"task": cfg.task_name, "code_version": code_version(), "stages": folders})
        pipeline.point_latest_run(cfg.paths.log_dir, run_dir)
    return metrics, run_dir, is_zero


def duration(seconds: float) -> str:
    """``41 s``, ``3 min 05 s``, ``2 h 07 min``: how long a stage took, for a person."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def stage_summary(stage_cfg: DictConfig, entry: str) -> str:
    """What a stage runs, in a word: ``model=SDENearND`` (a train stage), ``evaluate``."""
    if entry == "evaluate":
        return "evaluate"
    target = OmegaConf.select(stage_cfg, "model._target_", default=None)
    return f"model={str(target).rsplit('.', 1)[-1]}" if target else "train"


def run_announced(label: str, stage: dict, overrides: list[str], run_dir: Path, folder: Path) -> None:
    """Compose a stage (:func:`compose_stage`) and run it (:func:`run_entry`), announced: ``<label> (<what>):
    started in <folder>``, the overrides that do not apply to it, and ``<label>: done in <time>``."""
    entry = stage.get("entry", "train")
    skipped: list[str] = []
    stage_cfg = compose_stage(stage, overrides, run_dir, folder, skipped)
    log.info("%s (%s): started in %s", label, stage_summary(stage_cfg, entry), folder)
    if skipped:
        log.info("  (overrides not for this stage: %s)", " ".join(skipped))
    started = time.monotonic()
    run_entry(stage_cfg, stage)
    log.info("%s: done in %s", label, duration(time.monotonic() - started))


def run_entry(stage_cfg: DictConfig, stage: dict) -> None:
    """Run one composed stage (``train``: :func:`run_stage`, ``evaluate``: ``evaluate.evaluate``), then wait until
    every process of a DDP run gets here, so that no rank reads the stage's record before rank 0 has written it.

    ``evaluate`` (not distributed) and ``rank_zero`` stages (composed with one device) run on rank 0 alone; the other
    ranks only wait. When such a stage comes first, no other process exists yet: the trainer of the first DDP stage
    starts them, and they find it finished."""
    entry = stage.get("entry", "train")
    alone = entry == "evaluate" or bool(stage.get("rank_zero"))
    if not alone or process_rank() == 0:
        if entry == "evaluate":
            from evaluate import evaluate

            evaluate(stage_cfg)
        else:
            run_stage(stage_cfg)
    barrier()


def run_foreach(name: str, stage: dict, cfg: DictConfig, overrides: list[str], run_dir: Path, folder: Path,
                label: str | None = None) -> None:
    """A ``foreach`` stage: the stage once per value in ``<folder>/<value>`` with ``KEY=value`` added to its own
    overrides; finished values are skipped. Records ``VALUE.KEY`` outputs and ``runs`` in ``<folder>/run.json``."""
    spec = OmegaConf.to_container(cfg.pipeline[name].foreach, resolve=True)  # e.g. values: ${selection_tasks}
    key, values = pipeline.foreach_spec(spec, name)
    label = label or f"stage {name!r}"
    if values == "all":
        values = pipeline.task_values(compose_stage(stage, overrides, run_dir, folder).datamodule)
        log.info("%s: foreach %s over all %d: %s", label, key, len(values), ", ".join(values))
    runs: dict = {}
    for number, value in enumerate(values, start=1):
        sub = folder / str(value)
        runs[str(value)] = str(sub)
        each = f"{label}, {key}={value} ({number}/{len(values)})"
        if pipeline.stage_done(sub):
            log.info("%s: finished before (%s), skipped", each, sub)
            continue
        own = [*stage["overrides"], f"{key}={pipeline.hydra_value(value)}"]
        run_name = f"{stage['run_name']}/{value}" if stage.get("run_name") else None
        run_announced(each, {**stage, "overrides": own, "run_name": run_name}, overrides, run_dir, sub)
    if process_rank() == 0:
        outputs, metrics = pipeline.foreach_record(runs)
        outputs["metrics"] = str(write_metrics(folder, metrics).resolve())
        pipeline.write_run_record(folder, outputs, {"task": cfg.task_name, "code_version": code_version(),
                                                    "foreach": {"key": key, "values": list(runs)}})
    barrier()


def compose_stage(stage: dict, overrides: list[str], run_dir: Path, folder: Path,
                  skipped: list[str] | None = None) -> DictConfig:
    """A stage's config, as if its command line were: the user's overrides that apply to it, the stage's own, and its
    place in the pipeline. A ``bare`` stage starts from the bare groups (``~experiment``, no ``debug``), not from the
    experiment: for a stage that shares nothing with the task (pretraining on another dataset). The user's overrides
    that do not apply go to ``skipped`` when given (else they are logged)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    entry = stage.get("entry", "train")
    placed = [*stage["overrides"], "pipeline=null", f"pipeline_dir={pipeline.hydra_value(str(run_dir))}",
              f"paths.output_dir={pipeline.hydra_value(str(folder))}"]
    placed += [f"{key}={pipeline.hydra_value(stage[key])}" for key in ("run_name", "run_group") if stage.get(key)]
    if stage.get("rank_zero") and entry == "train":  # rank 0 alone: one device, whatever the user's trainer.devices
        placed += ["trainer.devices=1", "++trainer.strategy=auto"]
    if stage.get("bare"):  # the pipeline's values (debug sizes included) reach it only through its own overrides
        overrides = ["~experiment", *(o for o in overrides if not o.lstrip("+~").startswith(("experiment=", "debug=")))]
    groups = {p.name for p in CONFIGS.iterdir() if p.is_dir()}

    def _compose(extra: list[str]) -> DictConfig:
        if GlobalHydra.instance().is_initialized():
            return compose(config_name=entry, overrides=[*extra, *placed])
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            return compose(config_name=entry, overrides=[*extra, *placed])

    groups_only = pipeline.group_choices(overrides, groups)
    base = _compose(groups_only)
    keep, skip = pipeline.applicable_overrides(overrides, base, groups)
    if skipped is not None:
        skipped.extend(skip)
    elif skip:
        log.info("  (overrides not for this stage: %s)", " ".join(skip))
    return _compose(keep) if keep != groups_only else base


@hydra.main(version_base="1.3", config_path="configs", config_name="train")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    with report_errors():
        metrics, run_dir, is_rank_zero = train(cfg, list(HydraConfig.get().overrides.task))
    if is_rank_zero:
        for key, value in sorted(metrics.items()):
            print(f"{key}: {float(value):.4f}" if hasattr(value, "__float__") else f"{key}: {value}")
        print(run_dir)


if __name__ == "__main__":
    main()
