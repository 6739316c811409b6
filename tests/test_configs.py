"""Every config composes, and every option of every group instantiates."""

from __future__ import annotations

import re
from pathlib import Path

import hydra
import pytest
import torch
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def config_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("name", ["train", "evaluate"])
def test_entry_configs_compose_and_resolve(compose_config, name):
    cfg = compose_config(name)
    container = OmegaConf.to_container(cfg, resolve=True)
    assert container["task_name"] == name
    assert container["datamodule"]["_target_"] == "datamodules.AnomalyDataModule"


# datamodule=classification (backbone pretraining) is no anomaly task: tests/models/test_backbone_pretrain.py
@pytest.mark.parametrize("option", [o for o in config_options("datamodule") if o != "classification"])
def test_every_datamodule_instantiates_and_sets_up(compose_config, option):
    # the folder config has no default category (it is the user's): the tiny layout's is "widget"
    extra = ["datamodule.dataset.category=widget"] if option == "folder" else []
    if option == "defect_types":  # the tiny layouts have 2 anomalies per type: too few for a disjoint third
        extra = ["datamodule.anomaly_train_fraction=0.5"]
    cfg = compose_config("train", [f"datamodule={option}", "debug=tiny", *extra])
    dm = hydra.utils.instantiate(cfg.datamodule)
    dm.setup("fit")
    assert len(dm.support) > 0 and len(dm.test_set) > 0
    record = dm.support[0]
    assert record["label"] == 0 and record["image"].shape[0] == 3
    labels = {dm.test_set[i]["label"] for i in range(len(dm.test_set))}
    assert labels == {0, 1}, f"{option}: the test split must hold normals and anomalies, got labels {labels}"


@pytest.mark.parametrize("group", ["model", "detector"])
def test_every_model_and_detector_instantiates(compose_config, group, tmp_path):
    import torch

    from anomgen.encoders.clip_text import save_concepts

    # what a config cannot hold by itself: the files an earlier stage writes (ADP's concepts, at the tiny CLIP width)
    concept = save_concepts(tmp_path / "concept.safetensors", {"<c-n>": torch.zeros(1, 32)})
    needs = {("detector", "adp"): [f"+detector.concepts.c_n='{concept}'"]}
    for option in config_options(group):
        cfg = compose_config("train", [f"{group}={option}", "debug=tiny", *needs.get((group, option), [])])
        obj = hydra.utils.instantiate(cfg[group])
        assert obj is not None


@pytest.mark.parametrize("option", config_options("trainer"))
def test_every_trainer_instantiates(compose_config, option):
    cfg = compose_config("train", [f"trainer={option}"])
    if option == "gpu" and not torch.cuda.is_available():
        with pytest.raises(Exception, match="gpu"):
            hydra.utils.instantiate(cfg.trainer)
        return
    trainer = hydra.utils.instantiate(cfg.trainer, logger=False)
    if option == "ddp":
        assert trainer.num_devices == 2


@pytest.mark.parametrize("group", ["logger", "callbacks"])
def test_every_logger_and_callback_instantiates(compose_config, group):
    from anomgen.runtime import instantiate_group

    for option in config_options(group):
        extra = ["quality=eap"] if option == "eap" else []  # the EAP callback takes its settings from quality/
        cfg = compose_config("train", [f"{group}={option}", *extra])
        objs = instantiate_group(cfg.get(group))
        expected = sum(1 for v in (cfg.get(group) or {}).values() if "_target_" in v)
        assert len(objs) == expected


def test_wandb_logger_is_offline_by_default(compose_config, monkeypatch):
    """Offline unless WANDB_MODE says otherwise; Lightning's ``offline`` switch (which overwrites WANDB_MODE for the
    whole process) stays off."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = compose_config("train")
    assert cfg.logger.wandb.mode == "offline" and cfg.logger.wandb.offline is False
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert compose_config("train").logger.wandb.mode == "disabled"
    monkeypatch.setenv("WANDB_MODE", "online")
    assert compose_config("train").logger.wandb.mode == "online"


def test_nothing_logs_in_to_wandb():
    """No code of the project calls ``wandb.login`` (a login can prompt); publishing a workspace
    (``python -m anomgen.dashboards``) uses a login made beforehand with ``wandb login``."""
    root = CONFIGS.parent
    files = [root / "train.py", root / "evaluate.py"]
    files += [p for folder in ("anomgen", "models", "callbacks", "datamodules", "benchmarks")
              for p in sorted((root / folder).rglob("*.py"))]
    login = re.compile(r"wandb\.login|from wandb import .*\blogin\b")
    assert [p for p in files if login.search(p.read_text())] == []


def test_unknown_config_key_is_an_error(compose_config):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="no_such_key"):
        compose_config("train", ["datamodule.no_such_key=1"])
    with pytest.raises(ConfigCompositionException, match="no_such_model"):
        compose_config("train", ["model=no_such_model"])


def test_validation_never_defaults_to_the_test_split():
    for path in sorted((CONFIGS / "datamodule").glob("*.yaml")):
        cfg = OmegaConf.load(path)
        assert cfg.get("validation", "holdout") != "test", f"{path.name} validates on the test split by default"


@pytest.mark.parametrize("experiment", ["fitymi_cifar10", "fitymi_mvtec", "fitymi_cub"])
def test_fitymi_paper_configs_sample_with_the_references_step_count(compose_config, experiment):
    """score_sde (configs/default_cifar10_configs.py, vp/cifar10_ddpmpp*.py) samples over sde.N = model.num_scales =
    1000 steps; the paper configs do too (num_steps null = every step), and debug=tiny shrinks them."""
    cfg = compose_config("train", [f"experiment={experiment}"])
    assert cfg.model.num_steps is None and cfg.model.sde.N == 1000 and cfg.model.sde.kind == "vp"
    assert compose_config("train", [f"experiment={experiment}", "debug=tiny"]).model.num_steps == 10


@pytest.mark.parametrize("experiment", ["fitymi_digits", "fitymi_animals", "sde_digits"])
def test_cpu_sde_experiments_keep_a_short_sampling_grid(compose_config, experiment):
    assert compose_config("train", [f"experiment={experiment}"]).model.num_steps == 100


def test_folder_without_a_category_is_an_error_naming_the_key(compose_config):
    """datamodule=folder has no category of its own: without one it is a ConfigError naming the key (mvtec.yaml's
    "bottle" used to survive the ??? and end in "unknown category 'bottle'")."""
    from anomgen.errors import ConfigError
    from anomgen.runtime import TRAIN_GROUPS, validate_config

    for extra in ([], ["debug=tiny"]):
        cfg = compose_config("train", ["datamodule=folder", *extra])
        with pytest.raises(ConfigError, match=r"^datamodule\.dataset\.category is required for datamodule=folder"):
            validate_config(cfg, TRAIN_GROUPS)
    validate_config(compose_config("train", ["datamodule=folder", "datamodule.dataset.category=widget"]), TRAIN_GROUPS)


def test_folder_config_is_mvtec_s_with_a_dataset_of_its_own(compose_config):
    """folder.yaml writes mvtec.yaml's settings out (it cannot inherit them: a merged ??? keeps the value below it):
    they must stay the same."""
    folder = OmegaConf.to_container(compose_config("train", ["datamodule=folder"]).datamodule, resolve=False)
    mvtec = OmegaConf.to_container(compose_config("train", ["datamodule=mvtec"]).datamodule, resolve=False)
    assert folder.pop("dataset") == {**mvtec.pop("dataset"), "_target_": "anomgen.data.Folder",
                                     "root": "${paths.folder_dir}", "category": "???"}
    assert folder == mvtec


@pytest.mark.parametrize("experiment", [None, *config_options("experiment")])
def test_every_experiment_passes_config_validation(compose_config, experiment):
    """What train.py and evaluate.py check before instantiating (anomgen.runtime.validate_config) accepts every shipped
    config, as a GPU user runs it and under debug=tiny."""
    from anomgen.runtime import EVALUATE_GROUPS, TRAIN_GROUPS, validate_config

    chosen = [f"experiment={experiment}"] if experiment else []
    for extra in ([], ["debug=tiny"]):
        validate_config(compose_config("train", [*chosen, *extra]), TRAIN_GROUPS)
        validate_config(compose_config("evaluate", [*chosen, *extra]), EVALUATE_GROUPS)
