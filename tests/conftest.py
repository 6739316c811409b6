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


#: a tiny open_clip architecture (random weights in tests): ViT 32 px, 2 layers of width 32; text 1 layer
TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_clip_name(tmp_path_factory) -> str:
    """The name of :data:`TINY_OPEN_CLIP`, registered with open_clip for the session."""
    import json

    import open_clip

    folder = tmp_path_factory.mktemp("open_clip_cfg")
    (folder / "anomgen-tiny-clip.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(folder)
    return "anomgen-tiny-clip"


@pytest.fixture
def one_thread():
    """Tiny tensors run faster and steadier on one thread on a shared 2-core machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """One folder of tiny dataset layouts for the whole session (written on first use)."""
    return tmp_path_factory.mktemp("tiny-cache")


def _compose_run(name: str, overrides: list[str], run_dir: Path, log_dir: Path, cache_dir: Path):
    """A config as ``@hydra.main`` would pass it, with its run folder, log and cache folders given; returns
    ``(config, the whole command line)`` (a pipeline passes the command line on to its stages).

    Without an ``experiment=`` override the config starts from the bare groups (``~experiment``)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from anomgen.pipeline import register_resolvers

    register_resolvers()
    run_dir = Path(run_dir)
    overrides = list(overrides or [])
    if not any(o.startswith("experiment=") for o in overrides):
        overrides.insert(0, "~experiment")  # the bare groups, not the default job (tested on its own)
    overrides = [f"paths.log_dir={log_dir}", f"paths.cache_dir={cache_dir}", *overrides]
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(config_name=name, overrides=overrides, return_hydra_config=True)
    GlobalHydra.instance().clear()
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        del cfg["hydra"]
    return cfg, overrides


@pytest.fixture(scope="session")
def compose_run():
    """:func:`_compose_run`, for fixtures of a wider scope than a test's ``tmp_path``."""
    return _compose_run


@pytest.fixture
def compose_config(tmp_path, tiny_cache):
    """``compose_config("train", [overrides])`` -> a config as ``@hydra.main`` would pass it, run folder in tmp
    (:func:`_compose_run`). The last command line is ``compose_config.overrides``: ``train(cfg, overrides)``."""

    def _compose(name: str, overrides: list[str] | None = None, run_dir: Path | None = None):
        cfg, _compose.overrides = _compose_run(name, overrides, run_dir or tmp_path / f"{name}-run", tmp_path / "logs",
                                              tiny_cache)
        return cfg

    return _compose


@pytest.fixture
def run_train(compose_config):
    """``run_train([overrides], run_dir)`` -> ``train.train`` of that command line (its pipeline, if it has one)."""

    def _run(overrides: list[str], run_dir: Path | None = None):
        from train import train

        cfg = compose_config("train", overrides, run_dir=run_dir)
        return train(cfg, compose_config.overrides)

    return _run


class _RunsCode:
    """Unpickling this calls ``os.mkdir(marker)``: the observable trace of code run by a crafted pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.fixture
def code_running_file(tmp_path):
    """``write(path, wrap=lambda code: code)`` -> ``marker``: ``torch.save`` of ``wrap(code)``, where unpickling
    ``code`` makes the folder ``marker``. Unpickling such a file in full is checked to run it, so that a test of its
    refusal (``marker`` must stay absent) can fail."""
    import torch

    def write(path: Path, wrap=lambda code: code) -> Path:
        probe = Path(tmp_path) / f"probe-{Path(path).name}"
        torch.save(wrap(_RunsCode(probe)), path)
        torch.load(path, weights_only=False)
        assert probe.is_dir(), "the crafted pickle must run code when unpickled in full"
        marker = Path(tmp_path) / f"ran-{Path(path).name}"
        torch.save(wrap(_RunsCode(marker)), path)
        return marker

    return write
