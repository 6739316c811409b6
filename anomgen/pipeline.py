"""Stages and pipelines: runs that meet on disk.

A **stage** is one run of ``train.py`` (fit and/or predict + export) or of ``evaluate.py`` (scoring). When it ends it
writes ``<run>/run.json``: ``complete: true`` and its ``outputs`` (checkpoint, synthetic set, backbone file, metrics
file ..., each a path). A **pipeline** is an experiment's ordered ``pipeline:`` mapping of stages::

    pipeline:
      sde: {overrides: [model=sde_nearnd, callbacks=fid]}
      oe:  {overrides: [model=vit_oe, "datamodule.outlier_exposure_set=${output:sde.synthetic_set}"]}
      evaluate: {entry: evaluate}

Each stage is composed like a command line (the experiment, then the user's overrides that apply to it, then the
stage's own) and runs in ``<run>/<stage>`` (or in its ``dir``, e.g. a cache shared by pipelines). A later stage names
an earlier stage's output through the ``${output:STAGE.KEY}`` resolver, never through Python. A stage whose record is
complete and whose outputs exist is skipped, so a pipeline rerun in the same folder (``hydra.run.dir=<run>``) resumes
where it stopped. A stage with a ``dir`` (a cache that pipelines share) is made by one run at a time
(:func:`stage_lock`): a pipeline that finds it being made waits, then skips it.

A stage with ``foreach: {key: KEY, values: [...] | all}`` runs once per value, in ``<stage folder>/<value>``, with the
extra override ``KEY=value`` (e.g. one synthetic validation set per normal class)::

    pipeline:
      diffstyle: {foreach: {key: datamodule.normal_class, values: [Dog, Cat]}, overrides: [model=diffstyle]}
      evaluate: {entry: evaluate}     # reads ${output:diffstyle.runs}: {Dog: <folder>, Cat: <folder>}

``values: all`` takes every task of the stage's dataset (:func:`task_values`: the categories for the defects protocol,
the classes present for one-vs-rest). Finished values are skipped like stages, so a rerun resumes at the first
unfinished value. The stage's ``run.json`` records ``VALUE.KEY`` for every output of every value (e.g.
``Dog.synthetic_set``, read as ``${output:diffstyle.Dog.synthetic_set}``) and ``runs: {value: folder}``; its
``metrics.json`` holds ``VALUE/KEY`` for every metric of every value.

Under DDP (``trainer.devices=N``) every process runs the pipeline; after each stage all wait until rank 0 has written
its record. ``evaluate`` stages and stages with ``rank_zero: true`` (a product cached for every later run, made the
same whatever the device count) run on rank 0 alone, on one device (``train.py``).

Outside a pipeline ``${output:KEY}`` reads the last ``train.py`` run under ``paths.log_dir`` (for a pipeline run, its
stages' outputs are there as ``STAGE.KEY``; a plain key is the last stage's that has it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from anomgen.errors import ConfigError
from anomgen.files import write_atomic, write_json
from anomgen.runtime import texture_task, tiny_layout

RUN_RECORD = "run.json"
PIPELINE_RECORD = "pipeline.json"
STAGE_RECORD = "stage.json"
LATEST_TRAIN_RUN = "latest_train_run.txt"
_NO_DEFAULT = object()
log = logging.getLogger("anomgen")


# -- records -------------------------------------------------------------------------------------------------------
def read_run_record(run_dir: str | Path) -> dict | None:
    """``<run_dir>/run.json``, or None when the run never finished."""
    path = Path(run_dir) / RUN_RECORD
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete it to run that stage again") from err
    return record if isinstance(record, dict) else None


def write_run_record(run_dir: str | Path, outputs: Mapping[str, Any], info: Mapping[str, Any]) -> Path:
    """Mark ``run_dir`` complete with its ``outputs`` (written last, atomically: a run killed before has no record)."""
    record = {**dict(info), "complete": True, "outputs": {k: v for k, v in outputs.items() if v is not None}}
    return write_json(Path(run_dir) / RUN_RECORD, record)


def point_latest_run(log_dir: str | Path, run_dir: str | Path) -> None:
    """``<log_dir>/latest_train_run.txt`` names ``run_dir``: what ``${output:...}`` reads outside a pipeline."""
    write_atomic(Path(log_dir) / LATEST_TRAIN_RUN, str(Path(run_dir).resolve()) + "\n")


def latest_train_run(log_dir: str | Path) -> Path | None:
    pointer = Path(log_dir) / LATEST_TRAIN_RUN
    return Path(pointer.read_text().strip()) if pointer.is_file() else None


def stage_done(run_dir: str | Path) -> bool:
    """The stage in ``run_dir`` finished: its record is complete and every output path it names still exists."""
    record = read_run_record(run_dir)
    if not record or not record.get("complete"):
        return False
    paths = [v for v in record.get("outputs", {}).values() if isinstance(v, str) and v.startswith("/")]
    return all(Path(p).exists() for p in paths)


@contextmanager
def stage_lock(folder: str | Path, label: str = "stage") -> Iterator[Path | None]:
    """Hold an exclusive lock on ``<folder>.lock`` (a file beside the stage's folder) for the block: a stage cached in
    a folder that several pipelines share (its ``dir``) is made by one of them, and a pipeline that finds the lock
    taken waits (saying so), then finds the stage finished and reuses it. POSIX ``flock``: released when the process
    ends, however it ends. Yields the lock file (``None`` where ``fcntl`` does not exist: no lock)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield None
        return
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock_file = folder.with_name(folder.name + ".lock")
    with open(lock_file, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("%s: another run is making %s; waiting for it (lock %s)", label, folder, lock_file)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield lock_file
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_stage_overrides(run_dir: str | Path, overrides: list[str]) -> Path:
    """``<run_dir>/stage.json``: the stage's own overrides (resolved), what :func:`check_same_stage` compares."""
    return write_json(Path(run_dir) / STAGE_RECORD, {"overrides": list(overrides)})


def check_same_stage(run_dir: str | Path, name: str, overrides: list[str]) -> None:
    """A finished stage is reused only when it was made with the same overrides (e.g. a backbone cached for another
    number of epochs or images is an error, not a silent reuse)."""
    path = Path(run_dir) / STAGE_RECORD
    made = json.loads(path.read_text())["overrides"] if path.is_file() else None
    if made is not None and made != list(overrides):
        changed = sorted(set(made) ^ set(overrides))
        raise ConfigError(f"stage {name!r}: {run_dir} was made with other settings ({', '.join(changed)}); delete "
                         "that folder to run the stage again, or run the pipeline in another folder")


def stage_dirs(pipeline_dir: str | Path) -> dict[str, str]:
    """Stage name -> folder, as the pipeline recorded them in ``pipeline.json``."""
    path = Path(pipeline_dir) / PIPELINE_RECORD
    return json.loads(path.read_text())["stages"] if path.is_file() else {}


# -- the ${output:...} resolver --------------------------------------------------------------------------------------
def stage_output(ref: str, pipeline_dir: str | Path) -> Any:
    """``STAGE.KEY`` of the pipeline in ``pipeline_dir``: the output KEY that stage recorded."""
    name, _, key = ref.partition(".")
    if not key:
        raise ConfigError(f"${{output:{ref}}} inside a pipeline names a stage and an output: STAGE.KEY")
    folders = stage_dirs(pipeline_dir)
    if name not in folders:
        raise ConfigError(f"${{output:{ref}}}: pipeline {pipeline_dir} has no stage {name!r} before this one "
                         f"(stages: {', '.join(folders) or 'none'})")
    record = read_run_record(folders[name])
    if record is None:
        raise ConfigError(f"${{output:{ref}}}: stage {name!r} ({folders[name]}) has not finished")
    outputs = record.get("outputs", {})
    if key not in outputs:
        raise ConfigError(f"${{output:{ref}}}: stage {name!r} recorded no output {key!r} "
                         f"(it has: {', '.join(sorted(outputs)) or 'none'})")
    return outputs[key]


def run_output(ref: str, log_dir: str | Path) -> Any:
    """Output ``ref`` of the last ``train.py`` run under ``log_dir``."""
    run = latest_train_run(log_dir)
    if run is None:
        raise ConfigError(f"${{output:{ref}}}: no train.py run has finished under {log_dir} (run train.py first, or "
                         "give the value on the command line)")
    record = read_run_record(run)
    outputs = (record or {}).get("outputs", {})
    if ref not in outputs:
        raise ConfigError(f"${{output:{ref}}}: the last train.py run ({run}) recorded no output {ref!r} "
                         f"(it has: {', '.join(sorted(outputs)) or 'none'})")
    return outputs[ref]


def output_resolver(ref: str, default: Any = _NO_DEFAULT, *, _root_: DictConfig) -> Any:
    """``${output:STAGE.KEY}`` inside a pipeline; ``${output:KEY}`` or ``${output:KEY,DEFAULT}`` outside one."""
    pipeline_dir = OmegaConf.select(_root_, "pipeline_dir", default=None)
    try:
        if pipeline_dir:
            return stage_output(ref, pipeline_dir)
        return run_output(ref, OmegaConf.select(_root_, "paths.log_dir"))
    except ValueError:
        if default is _NO_DEFAULT:
            raise
        return default


def pipeline_outputs(stage_records: Mapping[str, Mapping]) -> dict:
    """A pipeline's outputs: ``STAGE.KEY`` for every stage output, and plain ``KEY`` for the last stage having it."""
    out: dict = {}
    for name, record in stage_records.items():
        for key, value in (record.get("outputs") or {}).items():
            out[f"{name}.{key}"] = value
            out[key] = value
    return out


# -- foreach stages ------------------------------------------------------------------------------------------------
def foreach_spec(spec: Any, stage: str) -> tuple[str, list | str]:
    """``(key, values)`` of a stage's resolved ``foreach`` mapping; ``values`` is a list or ``"all"``."""
    if not isinstance(spec, Mapping) or set(spec) != {"key", "values"} or not isinstance(spec["key"], str):
        raise ConfigError(f"pipeline stage {stage!r}: foreach is {{key: <override key, e.g. datamodule.normal_class>, "
                         f"values: [...] | all}}, got {spec!r}")
    values = spec["values"]
    if values != "all" and (isinstance(values, (str, Mapping)) or not isinstance(values, (list, tuple)) or not values):
        raise ConfigError(f"pipeline stage {stage!r}: foreach.values is a non-empty list or 'all', got {values!r}")
    if values != "all" and len({str(v) for v in values}) != len(values):
        raise ConfigError(f"pipeline stage {stage!r}: foreach.values has repeated values: {list(values)}")
    return spec["key"], values


def task_values(datamodule: DictConfig) -> list[str]:
    """Every task of a datamodule config: the dataset's categories for the ``defects`` protocol (one category per
    task), else the classes its training split has images of (one normal class per task), in the dataset's order."""
    from hydra.utils import instantiate

    dataset = instantiate(datamodule.dataset)(split=datamodule.get("train_split") or "train")
    known = [str(c) for c in getattr(dataset, "available_categories", None) or []]
    if datamodule.get("protocol") == "defects":
        return known
    present = dict.fromkeys(str(e.category) for e in dataset.entries)
    return [c for c in known if c in present] + [c for c in present if c not in known]  # the dataset's order


def foreach_record(runs: Mapping[str, str]) -> tuple[dict, dict]:
    """The outputs (``VALUE.KEY`` and ``runs``) and metrics (``VALUE/KEY``) of a foreach stage from its value runs."""
    outputs: dict = {}
    metrics: dict = {}
    for value, folder in runs.items():
        record = read_run_record(folder) or {}
        for key, path in (record.get("outputs") or {}).items():
            outputs[f"{value}.{key}"] = path
        metrics_file = (record.get("outputs") or {}).get("metrics")
        if metrics_file and Path(metrics_file).is_file():
            metrics.update({f"{value}/{k}": v for k, v in json.loads(Path(metrics_file).read_text()).items()})
    return {**outputs, "runs": dict(runs)}, metrics


# -- composing a stage -----------------------------------------------------------------------------------------------
def _parsed(overrides: list[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides(overrides)


def _is_group_choice(override, groups: set[str]) -> bool:
    return override.key_or_group.split("@")[0].lstrip("/") in groups or override.package is not None


def group_choices(overrides: list[str], groups: set[str]) -> list[str]:
    """The overrides among ``overrides`` that choose (or delete) an option of a config group in ``groups``
    (``datamodule=mvtec``, ``~experiment``, ``+debug=tiny``), in their order."""
    return [text for text, override in zip(overrides, _parsed(overrides)) if _is_group_choice(override, groups)]


def applicable_overrides(overrides: list[str], base: DictConfig, groups: set[str]) -> tuple[list[str], list[str]]:
    """Split the user's command-line ``overrides`` into those that apply to a stage whose config (composed without
    them) is ``base``, and those that do not. Group choices (``datamodule=mvtec``, ``debug=tiny``) apply to every stage;
    a value (``model.sde.kind=ve``, ``+trainer.fast_dev_run=true``) applies where its key (for ``+``: its parent)
    exists, so that ``model.*`` values reach the stages whose model has them. ``hydra.*`` is the pipeline's own."""
    raw = OmegaConf.to_container(base, resolve=False)  # keys, whether or not their values resolve yet

    def has(dotted: str) -> bool:
        node = raw
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    keep, skip = [], []
    for text, override in zip(overrides, _parsed(overrides)):
        key = override.key_or_group
        if key.startswith("hydra.") or key == "hydra":
            skip.append(text)
            continue
        if _is_group_choice(override, groups):
            keep.append(text)
            continue
        probe = key.rsplit(".", 1)[0] if override.is_add() or override.is_force_add() else key
        found = (probe == key and override.is_add()) or has(probe)
        (keep if found else skip).append(text)
    return keep, skip


def hydra_value(value: Any) -> str:
    """``value`` written as a command-line override value (null, true, numbers, quoted strings, lists, dicts)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {hydra_value(v)}" for k, v in value.items()) + "}"
    return "[" + ", ".join(hydra_value(v) for v in value) + "]"


def resolve_override(text: str, cfg: DictConfig) -> str:
    """A stage's override with the ``${...}`` of its value resolved in the pipeline's config ``cfg`` (so that a stage
    composed from the bare groups can use the experiment's keys, and ``${output:...}`` of the stages before it)."""
    key, sep, value = text.partition("=")
    if not sep or "${" not in value:
        return text
    probe = OmegaConf.create({"value": value})
    probe._set_parent(cfg)  # interpolations resolve against the pipeline's root
    try:
        resolved = probe.value
    except Exception as err:  # omegaconf wraps resolver errors: name the stage override
        raise ConfigError(f"pipeline override {text!r}: {err}") from err
    resolved = OmegaConf.to_container(resolved, resolve=True) if OmegaConf.is_config(resolved) else resolved
    return f"{key}={hydra_value(resolved)}"


def register_resolvers() -> None:
    """``${output:...}`` (above), ``${tiny_layout:...}`` and ``${texture_task:...}`` (:mod:`anomgen.runtime`)."""
    for name, fn in (("output", output_resolver), ("tiny_layout", tiny_layout), ("texture_task", texture_task)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
