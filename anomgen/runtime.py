"""What the entry points share that is not Lightning: config resolvers, the run's metrics file, code version.

Resolvers (registered by :func:`register_resolvers`, which the entry points and tests call):

- ``${tiny_layout:NAME,DIR}``: write (once) a tiny copy of dataset layout NAME under DIR and return its root; the
  ``debug=tiny`` profile points every dataset path at one.
- ``${latest_set:LOG_DIR}``: the synthetic set exported by the last ``train.py`` run under LOG_DIR.
- ``${latest_run:LOG_DIR}``: that run's folder (e.g. for the backbone an outlier-exposure stage wrote there).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from pathlib import Path

from omegaconf import OmegaConf

import anomgen
from anomgen.files import to_json, write_atomic, write_json

LATEST_TRAIN_RUN = "latest_train_run.txt"


def tiny_layout(name: str, directory: str) -> str:
    from anomgen.data import layouts

    return layouts.tiny_layout(name, Path(directory) / name)  # written atomically, reused once finished


def latest_train_run(log_dir: str) -> Path | None:
    pointer = Path(log_dir) / LATEST_TRAIN_RUN
    return Path(pointer.read_text().strip()) if pointer.is_file() else None


def latest_set(log_dir: str) -> str | None:
    """The ``synthetic_set`` folder of the last train run, or None when there is none."""
    run = latest_train_run(log_dir)
    if run is None:
        return None
    info = run / "run.json"
    if info.is_file():
        path = json.loads(info.read_text()).get("synthetic_set")
        return path if path and Path(path).is_dir() else None
    return None


def latest_run(log_dir: str) -> str | None:
    """The folder of the last train run under ``log_dir`` (None when there is none)."""
    run = latest_train_run(log_dir)
    return None if run is None else str(run)


def register_resolvers() -> None:
    for name, fn in (("tiny_layout", tiny_layout), ("latest_set", latest_set), ("latest_run", latest_run)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


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


def record_run(log_dir: str | Path, run_dir: str | Path, info: Mapping) -> None:
    """Write ``<run_dir>/run.json`` and point ``<log_dir>/latest_train_run.txt`` at the run."""
    write_json(Path(run_dir) / "run.json", dict(info))
    write_atomic(Path(log_dir) / LATEST_TRAIN_RUN, str(Path(run_dir).resolve()) + "\n")


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


def instantiate_group(cfg) -> list:
    """Instantiate every entry of a config group mapping (callbacks, loggers) that has a ``_target_``."""
    import hydra

    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if hasattr(c, "keys") and "_target_" in c]


def finish_loggers(loggers: list) -> None:
    """Close loggers, so that nothing they print comes after the run directory (wandb prints at exit otherwise)."""
    for logger in loggers:
        logger.finalize("success")
        if type(logger).__name__ == "WandbLogger":
            import wandb

            wandb.finish()
