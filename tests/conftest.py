"""Shared fixtures: offline environment, Hydra config composition into a temporary run folder."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
os.environ.setdefault("ANOMGEN_ROOT", str(ROOT))


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """One folder of tiny dataset layouts for the whole session (written on first use)."""
    return tmp_path_factory.mktemp("tiny-cache")


@pytest.fixture
def compose_config(tmp_path, tiny_cache):
    """``compose_config("train", [overrides])`` -> a config as ``@hydra.main`` would pass it, run folder in tmp.

    Without an ``experiment=`` override the config starts from the bare groups (``~experiment``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from anomgen.runtime import register_resolvers

    register_resolvers()

    def _compose(name: str, overrides: list[str] | None = None, run_dir: Path | None = None):
        run_dir = Path(run_dir or tmp_path / f"{name}-run")
        overrides = list(overrides or [])
        if not any(o.startswith("experiment=") for o in overrides):
            overrides.insert(0, "~experiment")  # the bare groups, not the default job (tested on its own)
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
            cfg = compose(
                config_name=name,
                overrides=[f"paths.log_dir={tmp_path / 'logs'}", f"paths.cache_dir={tiny_cache}", *overrides],
                return_hydra_config=True,
            )
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(run_dir)
            cfg.hydra.job.num = 0
        HydraConfig.instance().set_config(cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        with open_dict(cfg):
            cfg.paths.output_dir = str(run_dir)
            del cfg["hydra"]
        return cfg

    yield _compose
    GlobalHydra.instance().clear()
