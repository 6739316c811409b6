"""What the entry points share that is not Lightning: config resolvers, the run's metrics file, code version.

Resolvers (registered by :func:`anomgen.pipeline.register_resolvers`, which the entry points and tests call):

- ``${tiny_layout:NAME,DIR}``: write (once) a tiny copy of dataset layout NAME under DIR and return its root; the
  ``debug=tiny`` profile points every dataset path at one.
- ``${texture_task:DIR}``: write (once) the real-texture task of :mod:`anomgen.data.textures` (default settings) at
  DIR and return it; ``paths.textures_dir`` defaults to one in the cache folder.
- ``${output:KEY}``: an output of an earlier stage or run (:mod:`anomgen.pipeline`).
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

import anomgen
from anomgen.files import to_json, write_json


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
