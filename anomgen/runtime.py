"""What the entry points share that is not Lightning: config resolvers, the run's metrics file, code version, the check
of a composed config before anything is built from it (:func:`validate_config`: ``???`` values left, types and ranges,
one error naming the key), how the project's own errors end a run (:func:`report_errors`), the config's folders the
library reads (:func:`with_config_paths`), how many data-loading workers a machine gets, one copy of each log line
(:func:`tidy_lightning_logging`).

Resolvers (registered by :func:`anomgen.pipeline.register_resolvers`, which the entry points and tests call):

- ``${tiny_layout:NAME,DIR}``: write (once) a tiny copy of dataset layout NAME under DIR and return its root; the
  ``debug=tiny`` profile points every dataset path at one.
- ``${texture_task:DIR}``: write (once) the real-texture task of :mod:`anomgen.data.textures` (default settings) at
  DIR and return it; ``paths.textures_dir`` defaults to one in the cache folder.
- ``${output:KEY}``: an output of an earlier stage or run (:mod:`anomgen.pipeline`).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import anomgen
from anomgen.errors import AnomgenError, ConfigError
from anomgen.files import to_json, write_json
from anomgen.pretrained import use_pretrained_dir

#: set to 1 for the whole traceback of the project's own errors (Hydra's HYDRA_FULL_ERROR=1 does the same)
TRACEBACK_ENV = "ANOMGEN_TRACEBACK"
#: data-loading workers when a datamodule's num_workers is null: at most this many, one CPU left to the main process
MAX_DEFAULT_WORKERS = 4


def tiny_layout(name: str, directory: str) -> str:
    from anomgen.data import layouts

    return layouts.tiny_layout(name, Path(directory) / name)  # written atomically, reused once finished


def texture_task(directory: str) -> str:
    from anomgen.data.textures import write_texture_task

    return write_texture_task(directory)  # written atomically, reused once finished (same settings)


def flatten(metrics: Mapping, prefix: str = "", sep: str = "/") -> dict:
    out = {}
    for key, value in metrics.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten(value, name, sep))
        else:
            out[name] = value
    return out


def write_metrics(run_dir: str | Path, metrics: Mapping) -> Path:
    """The run's final metrics as flat keys in ``<run_dir>/metrics.json`` (NaN / inf as null)."""
    return write_json(Path(run_dir) / "metrics.json", to_json(flatten(metrics)))


def code_version() -> str:
    """The package version, plus the git commit (and ``-dirty``) when run from a checkout."""
    here = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return f"{anomgen.__version__}+g{sha}{'-dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return anomgen.__version__


def used_config(cfg, keys=None) -> dict:
    """The top-level ``keys`` of ``cfg`` (default: all), each resolved against the whole config; what cannot be
    resolved yet (e.g. ``${output:...}`` of a later pipeline stage) stays as written. For logging what a run used."""
    from omegaconf import Container, OmegaConf

    out = {}
    for key in cfg.keys() if keys is None else keys:
        try:
            node = cfg.get(key)
            out[key] = OmegaConf.to_container(node, resolve=True) if isinstance(node, Container) else node
        except Exception:  # noqa: BLE001 - an interpolation that only a later stage can resolve: as written
            out[key] = OmegaConf.to_container(cfg, resolve=False).get(key)
    return out


def instantiate_group(cfg) -> list:
    """Instantiate every entry of a config group mapping (callbacks, loggers) that has a ``_target_``."""
    import hydra

    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if hasattr(c, "keys") and "_target_" in c]


def finish_loggers(loggers: list, status: str = "success") -> None:
    """Close loggers, so that nothing they print comes after the run directory (wandb prints at exit otherwise).
    ``status="failed"`` after an error: the W&B run ends as failed rather than staying open for the next run of the
    process to attach to."""
    for logger in loggers:
        logger.finalize(status)
        if type(logger).__name__ == "WandbLogger":
            import wandb

            wandb.finish(exit_code=0 if status == "success" else 1)


def with_config_paths(run: Callable) -> Callable:
    """``run(cfg, ...)`` with the folders of ``cfg.paths`` that the library reads in effect: ``paths.pretrained_dir``
    is searched for weights (:func:`anomgen.pretrained.use_pretrained_dir`). train.py's ``run_stage`` and
    evaluate.py's ``evaluate`` are wrapped in it, so that every stage of a pipeline uses its own config's folder."""

    @functools.wraps(run)
    def wrapped(cfg, *args, **kwargs):
        from omegaconf import OmegaConf

        with use_pretrained_dir(OmegaConf.select(cfg, "paths.pretrained_dir", default=None)):
            return run(cfg, *args, **kwargs)

    return wrapped


# ----------------------------------------------------------------------------------------------- config validation

#: the config groups each entry point instantiates (their ``???`` values must be given; the others may stay unset)
TRAIN_GROUPS = ("datamodule", "model", "trainer", "callbacks", "logger")
EVALUATE_GROUPS = ("datamodule", "detector", "detectors", "synthetic_sets", "selection", "pixel_metrics",
                   "generation_metrics", "logger")


def _integer(low: int, nullable: bool = True, note: str = "") -> tuple[Callable, str]:
    what = f"an integer >= {low}{note}" + (" or null" if nullable else "")
    return (lambda v: (v is None and nullable) or (isinstance(v, int) and not isinstance(v, bool) and v >= low)), what


def _number(low: float, high: float, nullable: bool = True) -> tuple[Callable, str]:
    what = f"a number in [{low}, {high}]" + (" or null" if nullable else "")
    return (lambda v: (v is None and nullable) or (_is_number(v) and low <= v <= high)), what


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value  # not NaN


def _batches(value) -> bool:
    """Lightning's ``limit_*_batches``: a count (int >= 0) or a fraction of the loader (float in [0, 1])."""
    if value is None:
        return True
    if isinstance(value, int) and not isinstance(value, bool):
        return value >= 0
    return isinstance(value, float) and 0.0 <= value <= 1.0


#: key -> (check, what it must be): the values Lightning and the datamodules take without checking their type
CHECKED_VALUES: dict[str, tuple[Callable, str]] = {
    "seed": _integer(0, nullable=False),
    "trainer.max_epochs": _integer(-1, note=" (-1: no limit)"),
    "trainer.min_epochs": _integer(0),
    "trainer.max_steps": _integer(-1, nullable=False, note=" (-1: no limit)"),
    "trainer.min_steps": _integer(0),
    "trainer.accumulate_grad_batches": _integer(1, nullable=False),
    "trainer.check_val_every_n_epoch": _integer(1),
    "trainer.log_every_n_steps": _integer(1),
    "trainer.num_sanity_val_steps": _integer(-1, note=" (-1: all)"),
    "trainer.fast_dev_run": ((lambda v: isinstance(v, bool) or (isinstance(v, int) and v >= 0)),
                             "true, false or a number of batches >= 0"),
    "trainer.gradient_clip_val": ((lambda v: v is None or (_is_number(v) and v >= 0)), "a number >= 0 or null"),
    **{f"trainer.limit_{split}_batches": (_batches, "a number of batches (an integer >= 0) or a fraction of them "
                                                   "(a float in [0, 1]) or null")
       for split in ("train", "val", "test", "predict")},
    "datamodule.batch_size": _integer(1, nullable=False),
    "datamodule.eval_batch_size": _integer(1),
    "datamodule.num_workers": _integer(0, note=" (null: as many as the machine allows)"),
    "datamodule.k_shot": _integer(1, note=" (null: every normal training image)"),
    "datamodule.support_seed": _integer(0),
    "datamodule.holdout_seed": _integer(0),
    "datamodule.train_repeats": _integer(1, nullable=False),
}
#: every key of this name in the groups an entry point instantiates is a fraction: a number in [0, 1] or null
FRACTION_SUFFIX = "_fraction"
_ABSENT = object()


def group_choice(cfg, group: str) -> str | None:
    """The option of config group ``group`` this run composed (``datamodule=folder``), when Hydra knows it: only for
    the job's own config (a pipeline's stage is composed apart, with choices of its own that Hydra does not keep)."""
    from omegaconf import OmegaConf

    if OmegaConf.select(cfg, "pipeline_dir", default=None):
        return None
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None
    except Exception:  # noqa: BLE001 - a hint only
        return None


def _walk(node, prefix: str):
    """``(dotted key, node)`` of every node under ``node``, read without resolving any interpolation (an
    ``${output:...}`` that only a later stage can resolve is not touched)."""
    from omegaconf import DictConfig, ListConfig

    if isinstance(node, DictConfig):
        keys = [(key, f"{prefix}.{key}") for key in node.keys()]
    elif isinstance(node, ListConfig):
        keys = [(i, f"{prefix}[{i}]") for i in range(len(node))]
    else:
        return
    for key, name in keys:
        child = node._get_node(key)
        yield name, child
        if not (child._is_missing() or child._is_none() or child._is_interpolation()):
            yield from _walk(child, name)


def validate_config(cfg, groups: tuple[str, ...] = TRAIN_GROUPS) -> None:
    """Check a composed config before anything is instantiated from it; a :class:`~anomgen.errors.ConfigError`
    names the key and its value. train.py's ``run_stage`` calls it with :data:`TRAIN_GROUPS`, evaluate.py's
    ``evaluate`` with :data:`EVALUATE_GROUPS` (the groups each instantiates):

    - no mandatory value (``???``) is left in those groups (e.g. ``datamodule.dataset.category`` of
      ``datamodule=folder``);
    - the values in :data:`CHECKED_VALUES` that are present have their type and range (``trainer.max_epochs``: an
      integer >= -1 or null; ``datamodule.batch_size``: an integer >= 1 ...), the ``trainer.*`` ones only when
      ``trainer`` is among ``groups``;
    - every ``*_fraction`` key in those groups (``datamodule.holdout_fraction``, ``datamodule.dataset.test_fraction``,
      ``model.min_fraction`` ...) is a number in [0, 1] or null (a constructor may narrow the range further).
    """
    from omegaconf import DictConfig, OmegaConf

    present = [g for g in groups if isinstance(cfg.get(g), DictConfig)]
    for group in present:
        missing = [key for key, node in _walk(cfg[group], group) if node._is_missing()
                   and not node._is_interpolation()]
        if missing:
            choice = group_choice(cfg, group)
            where = f" for {group}={choice}" if choice else ""
            raise ConfigError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} required{where} (the "
                              f"config leaves {'it' if len(missing) == 1 else 'them'} ???): give "
                              + " ".join(f"{key}=<value>" for key in missing))
    keys = [k for k in CHECKED_VALUES if k.partition(".")[0] in ("seed", *present)]
    fractions = [key for group in present for key, _ in _walk(cfg[group], group)
                 if key.rpartition(".")[2].endswith(FRACTION_SUFFIX)]
    for key in [*keys, *fractions]:
        value = OmegaConf.select(cfg, key, default=_ABSENT)
        if value is _ABSENT:
            continue
        check, what = CHECKED_VALUES.get(key) or _number(0.0, 1.0)
        if not check(value):
            raise ConfigError(f"{key} must be {what}, got {value!r}")


# ------------------------------------------------------------------------------------------ errors at the entry points


def own_error(err: BaseException) -> AnomgenError | None:
    """The project's own error behind ``err``: ``err`` itself, or the one it was raised from (Hydra raises an
    ``InstantiationException`` from an error of a constructor it calls); ``None`` when there is none.

    A plain ``ValueError`` that a component's constructor raised while Hydra instantiated it from the config (e.g.
    ``model.sde.kind=xx`` reaching ``score_unet``) is a value of the config that the component refused: it comes back
    as a :class:`~anomgen.errors.ConfigError` naming the config key (``model.unet: unknown SDE kind 'xx'; ...``)."""
    chain: list[BaseException] = []
    while err is not None and all(err is not seen for seen in chain):
        if isinstance(err, AnomgenError):
            return err
        chain.append(err)
        err = err.__cause__
    return refused_config_value(chain)


def refused_config_value(chain: list[BaseException]) -> ConfigError | None:
    """The innermost Hydra ``InstantiationException`` of ``chain`` (an error and its causes) raised from a
    ``ValueError``, as a ``ConfigError`` ``"<full_key>: <message>"``; ``None`` when there is none."""
    from hydra.errors import InstantiationException

    for outer, cause in reversed(list(zip(chain, chain[1:]))):
        if isinstance(outer, InstantiationException) and type(cause) is ValueError:
            key = re.search(r"^full_key: (\S+)$", str(outer), re.M)
            return ConfigError(f"{key.group(1)}: {cause}" if key else str(cause))
    return None


def error_message(err: BaseException) -> str:
    """``str(err)``; for an error that a DataLoader worker raised, the worker's message without the worker's traceback
    (torch re-raises it in the main process with the traceback prepended)."""
    text = str(err)
    if "Original Traceback" in text:
        found = re.search(rf"^(?:[\w.]+\.)?{re.escape(type(err).__name__)}: (.*)\Z", text, re.M | re.S)
        text = found.group(1) if found else text
    return text.strip()


def full_traceback_wanted() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in (TRACEBACK_ENV, "HYDRA_FULL_ERROR"))


@contextmanager
def report_errors() -> Iterator[None]:
    """Around the body of an entry point (train.py, evaluate.py): the project's own error
    (:class:`~anomgen.errors.AnomgenError`, also when Hydra wrapped it while instantiating a config) ends the run
    with ``error: <message>`` on stderr and exit code 1 instead of a traceback. ``ANOMGEN_TRACEBACK=1`` (or
    ``HYDRA_FULL_ERROR=1``) lets it through whole. Any other exception goes through untouched: it is a bug or a
    library's error, where the traceback is what is needed."""
    try:
        yield
    except Exception as err:
        own = own_error(err)
        if own is None or full_traceback_wanted():
            raise
        print(f"error: {error_message(own)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


# ------------------------------------------------------------------------------------------------------------ logging

#: Lightning's info lines that advertise rather than inform (the "litlogger" tip of every Trainer)
LIGHTNING_ADVERTS = ("litlogger",)
#: the loggers of Lightning that may carry a console handler of their own (``lightning`` always adds one on import,
#: ``lightning.pytorch`` and ``lightning.fabric`` when the root logger had none at their import)
LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


class DropLightningAdverts(logging.Filter):
    """Drops the records of :data:`LIGHTNING_ADVERTS` (e.g. "💡 Tip: ... try installing [litlogger] ...")."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(advert in message for advert in LIGHTNING_ADVERTS)


def tidy_lightning_logging() -> None:
    """One copy of every Lightning log line, and no adverts; call after ``import lightning`` (train.py's
    ``run_stage`` and evaluate.py's ``evaluate`` do). Idempotent.

    ``import lightning`` gives the ``lightning`` logger a console handler of its own (``INFO: ...`` on stderr) and
    lets its records propagate as well, so that under Hydra's job logging (handlers on the root logger: the console
    and ``<run>/<job>.log``) every line came out twice. When the root logger has handlers, Lightning's own console
    handlers are removed and its records propagate to them alone (and so reach the run's log file); without any (the
    library used alone) they stay. Lightning's "litlogger" tip, printed by every Trainer, is dropped."""
    if logging.getLogger().handlers:
        for name in LIGHTNING_LOGGERS:
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler:  # Lightning's console handler, not a file handler
                    logger.removeHandler(handler)
            logger.propagate = True
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # rank_zero_info's logger
    if not any(isinstance(f, DropLightningAdverts) for f in rank_zero.filters):
        rank_zero.addFilter(DropLightningAdverts())


# ------------------------------------------------------------------------------------------------------ data loading


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, which containers and job schedulers set), else all of them."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def loader_workers(num_workers: int | None) -> int:
    """DataLoader workers: ``num_workers`` when given; for ``None``, ``min(4, usable CPUs - 1)`` (one CPU left to the
    main process; 0, loading in the main process, on a one-CPU machine)."""
    if num_workers is not None:
        if int(num_workers) < 0:
            raise ConfigError(f"num_workers must be >= 0 or null (as many as the machine allows), got {num_workers}")
        return int(num_workers)
    return max(0, min(MAX_DEFAULT_WORKERS, usable_cpus() - 1))
