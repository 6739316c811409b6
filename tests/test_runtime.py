"""anomgen.runtime: the project's own errors end an entry point with one message; data-loading workers per machine."""

from __future__ import annotations

import re
from pathlib import Path

import hydra
import pytest
from torch.utils.data import DataLoader, Dataset

from anomgen import runtime
from anomgen.errors import ConfigError, DatasetError
from anomgen.runtime import TRACEBACK_ENV, loader_workers, report_errors

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def no_traceback_env(monkeypatch):
    monkeypatch.delenv(TRACEBACK_ENV, raising=False)
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)


def _exit_of(raise_it, capsys) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as stopped:
        with report_errors():
            raise_it()
    return stopped.value.code, capsys.readouterr().err.splitlines()


def test_the_project_s_own_error_is_one_message_and_exit_code_1(no_traceback_env, capsys):
    def missing():
        raise DatasetError("mvtec_ad: folder not found: /data/nowhere")

    code, lines = _exit_of(missing, capsys)
    assert code == 1 and lines == ["error: mvtec_ad: folder not found: /data/nowhere"]


class _Refuses:
    def __init__(self, key: str) -> None:
        raise ConfigError(f"datamodule.{key} must be one of (a, b), got 'c'")


def test_an_error_hydra_wrapped_while_instantiating_is_unwrapped(no_traceback_env, capsys):
    target = {"_target_": f"{__name__}._Refuses", "key": "protocol"}
    code, lines = _exit_of(lambda: hydra.utils.instantiate(target), capsys)
    assert code == 1 and lines == ["error: datamodule.protocol must be one of (a, b), got 'c'"]


class _BrokenImages(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        raise DatasetError(f"cannot read image file /data/{index:03d}.png: truncated")


def test_an_error_of_a_dataloader_worker_comes_without_the_worker_s_traceback(no_traceback_env, capsys):
    loader = DataLoader(_BrokenImages(), batch_size=1, num_workers=1)
    code, lines = _exit_of(lambda: next(iter(loader)), capsys)
    assert code == 1 and lines == ["error: cannot read image file /data/000.png: truncated"]


def _library_check(kind: str) -> str:
    """A library function that checks its argument with a plain ValueError (as anomgen.diffusion.sde does)."""
    if kind not in ("ve", "vp"):
        raise ValueError(f"unknown SDE kind {kind!r}; expected 've' or 'vp'")
    return kind


class _Holds:
    def __init__(self, unet) -> None:
        self.unet = unet


class _BuggyInside:
    def __init__(self) -> None:
        raise TypeError("a bug in a constructor")


def test_a_value_a_component_refused_while_instantiated_is_one_line_naming_the_key(no_traceback_env, capsys):
    """``model.sde.kind=xx`` reached a library check (a plain ValueError) through Hydra: five lines of Hydra's
    wrapping before. A ValueError raised while instantiating a config now prints as one line with the config key."""
    model = {"_target_": f"{__name__}._Holds", "unet": {"_target_": f"{__name__}._library_check", "kind": "xx"}}
    code, lines = _exit_of(lambda: hydra.utils.instantiate({"model": model}).model, capsys)
    assert code == 1 and lines == ["error: model.unet: unknown SDE kind 'xx'; expected 've' or 'vp'"]
    # other errors of a constructor (a bug) keep their traceback; so does a ValueError outside instantiation
    with pytest.raises(hydra.errors.InstantiationException, match="a bug in a constructor"):
        with report_errors():
            hydra.utils.instantiate({"_target_": f"{__name__}._BuggyInside"})
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("env", [TRACEBACK_ENV, "HYDRA_FULL_ERROR"])
def test_the_traceback_env_lets_the_error_through(no_traceback_env, monkeypatch, env):
    monkeypatch.setenv(env, "1")
    with pytest.raises(DatasetError, match="folder not found"):
        with report_errors():
            raise DatasetError("mvtec_ad: folder not found: /data/nowhere")


def test_other_errors_go_through_untouched(no_traceback_env, capsys):
    with pytest.raises(ValueError, match="a bug"):  # a bug or a library's error: its traceback is what is needed
        with report_errors():
            raise ValueError("a bug")
    with pytest.raises(KeyboardInterrupt):
        with report_errors():
            raise KeyboardInterrupt
    assert capsys.readouterr().err == ""


def test_loader_workers_default_to_what_the_machine_has(monkeypatch):
    assert loader_workers(0) == 0 and loader_workers(3) == 3  # a given number is kept, whatever the machine
    for cpus, expected in ((1, 0), (2, 1), (3, 2), (16, 4)):
        monkeypatch.setattr(runtime, "usable_cpus", lambda cpus=cpus: cpus)
        assert loader_workers(None) == expected
    with pytest.raises(ConfigError, match="num_workers must be >= 0 or null"):
        loader_workers(-1)


def test_datamodule_configs_leave_the_number_of_workers_to_the_machine(monkeypatch):
    """No datamodule config asks for 4 workers whatever the machine; null becomes the machine's number."""
    from omegaconf import OmegaConf

    from datamodules import AnomalyDataModule

    configs = sorted((ROOT / "configs" / "datamodule").glob("*.yaml"))
    given = {p.stem: OmegaConf.load(p).get("num_workers", "absent") for p in configs}
    assert given["mvtec"] is None and given["cub"] is None and given["digits"] == 0
    assert all(v in (None, 0, "absent") for v in given.values()), given
    monkeypatch.setattr(runtime, "usable_cpus", lambda: 2)
    dm = AnomalyDataModule(dataset=None, protocol="defects", num_workers=None)
    assert dm.num_workers == 1 and dm._loader([0, 1], shuffle=False).num_workers == 1
    assert AnomalyDataModule(dataset=None, protocol="defects", num_workers=3).num_workers == 3


# -------------------------------------------------------------------------------------------------- validate_config


@pytest.mark.parametrize("override, key, value", [
    ("trainer.max_epochs=abc", "trainer.max_epochs", "'abc'"),
    ("trainer.max_epochs=2.5", "trainer.max_epochs", "2.5"),
    ("+trainer.max_steps=ten", "trainer.max_steps", "'ten'"),
    ("datamodule.holdout_fraction=abc", "datamodule.holdout_fraction", "'abc'"),
    ("datamodule.dataset.test_fraction=1.5", "datamodule.dataset.test_fraction", "1.5"),
    ("datamodule.batch_size=0", "datamodule.batch_size", "0"),
    ("datamodule.num_workers=many", "datamodule.num_workers", "'many'"),
])
def test_validate_config_names_the_key_and_its_value(compose_config, override, key, value):
    """A value of the wrong type or range is one ConfigError naming the key and the value, before anything is
    instantiated (trainer.max_epochs=abc trained nothing, datamodule.holdout_fraction=abc was a raw TypeError)."""
    from anomgen.runtime import TRAIN_GROUPS, validate_config

    cfg = compose_config("train", [override])
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)} must be .*, got {re.escape(value)}$"):
        validate_config(cfg, TRAIN_GROUPS)


@pytest.mark.parametrize("overrides", [[], ["trainer.max_epochs=-1", "+trainer.max_steps=-1"],
                                       ["trainer.max_epochs=null", "+trainer.limit_train_batches=0.5"],
                                       ["datamodule.holdout_fraction=0", "datamodule.num_workers=null"]])
def test_validate_config_accepts_what_lightning_and_the_datamodules_take(compose_config, overrides):
    from anomgen.runtime import TRAIN_GROUPS, validate_config

    validate_config(compose_config("train", overrides), TRAIN_GROUPS)


def test_validate_config_checks_only_the_groups_of_the_entry_point(compose_config):
    """A ??? value is an error in a group the entry point instantiates, and left alone in one it does not (evaluate.py
    does not build the trainer); an ${output:...} that only a later stage can resolve is not resolved."""
    from omegaconf import open_dict

    from anomgen.runtime import EVALUATE_GROUPS, TRAIN_GROUPS, validate_config

    cfg = compose_config("evaluate", ["synthetic_sets.synthetic=null"])
    with open_dict(cfg):
        cfg.trainer.max_epochs = "???"
        cfg.detectors.later = {"_target_": "x", "checkpoint": "${output:no_stage.backbone}"}
    validate_config(cfg, EVALUATE_GROUPS)
    with pytest.raises(ConfigError, match=r"^trainer\.max_epochs is required .*give trainer\.max_epochs=<value>"):
        validate_config(cfg, TRAIN_GROUPS)
