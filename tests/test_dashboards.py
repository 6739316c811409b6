"""W&B workspaces (anomgen/dashboards.py): every workspace builds offline, the CLI prints it without publishing, and
every key a workspace's panels read is logged by a tiny run of its experiment (read from the run's offline files)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from anomgen import dashboards
from anomgen.errors import ConfigError


def test_every_known_experiment_builds_its_workspace_offline():
    known = dashboards.known_experiments()
    assert {dashboards.method_of(e) for e in known} == set(dashboards.SECTIONS)
    assert {"fitymi_digits", "selection_animals", "eap_digits", "localizer_mvtec", "anomalydiffusion_mvtec"} <= \
        set(known)
    for experiment in known:
        workspace = dashboards.build_workspace(experiment, entity="someone", project="somewhere")
        keys = dashboards.panel_keys(workspace)
        assert keys and all(wanted for _, wanted in keys), experiment  # every panel reads at least one key
        view = json.loads(json.dumps(dashboards.workspace_json(workspace)))
        assert view["entity"] == "someone" and view["project"] == "somewhere"
        sections = view["spec"]["section"]["panelBankConfig"]["sections"]
        assert [s["name"] for s in sections] == [s.name for s in workspace.sections]
        assert sum(len(s["panels"]) for s in sections) == len(keys)


def test_cli_prints_the_workspace_offline_and_names_the_known_experiments(capsys, monkeypatch):
    def no_publishing(workspace):
        raise AssertionError("the dry run must not publish")

    monkeypatch.setattr(dashboards, "publish", no_publishing)
    assert dashboards.main(["eap_digits", "--dry-run"]) == 0
    view = json.loads(capsys.readouterr().out)
    assert view["displayName"] == "anomgen EAP: eap_digits"
    assert dashboards.main(["no_such_experiment", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "no_such_experiment" in err and "fitymi_digits" in err and "localizer_mvtec" in err
    assert dashboards.main(["eap_digits"]) == 2  # publishing needs --entity
    assert "--entity" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="known experiments: .*selection_animals"):
        dashboards.build_workspace("sde_digits")  # an experiment of no method with a workspace


# -- the keys: tiny runs, read back from W&B's offline files -------------------------------------------------------
def _records(path: Path):
    """The records of a ``.wandb`` file (W&B's LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks with
    a 7-byte header each: CRC-32, length, type 1 full / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    pos, chunks = 7, []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:  # the zero padding of a block's end
            pos += left
            continue
        body, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        chunks = [body] if kind in (1, 2) else chunks + [body]
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            yield record


def logged(folder: Path) -> tuple[set[str], list[set[str]]]:
    """Every key logged by the W&B runs under ``folder`` (history and summary), and each run's tags."""
    keys, tags = set(), []
    files = sorted(folder.rglob("offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run under {folder}"
    for path in files:
        for record in _records(path):
            if record.HasField("history"):
                keys |= {item.key or item.nested_key[0] for item in record.history.item}
            elif record.HasField("summary"):
                keys |= {item.key or item.nested_key[0] for item in record.summary.update}
            elif record.HasField("run"):
                tags.append(set(record.run.tags))
    return keys, tags


TINY = ["debug=tiny", "logger=wandb", "trainer.log_every_n_steps=1"]  # every step's metrics reach the logger
#: FITYMI: a few sampling steps; an FID check every 2 steps, one band (so that a band set is exported); 1 OE epoch
FITYMI = ["model.num_steps=10", "callbacks.fid_early_stopping.every_n_steps=2",
          "callbacks.fid_early_stopping.num_samples=16", "callbacks.fid_early_stopping.bands=[[null,null]]",
          "oe.epochs=1"]
SLOW = pytest.mark.slow  # pipelines of 3 to 8 stages: 40 s to 2 min each on a 2-core machine


@pytest.mark.parametrize("experiment, extra", [
    ("eap_digits", []),
    ("localizer_mvtec", []),
    pytest.param("fitymi_digits", FITYMI, marks=SLOW),
    pytest.param("anomalydiffusion_mvtec", [], marks=SLOW),
    pytest.param("selection_animals", [], marks=SLOW),
])
def test_every_panel_key_is_logged_by_a_tiny_run(tmp_path, tiny_cache, compose_run, experiment, extra):
    from train import train

    cfg, overrides = compose_run("train", [f"experiment={experiment}", *TINY, *extra], tmp_path / "train",
                                 tmp_path / "logs", tiny_cache)
    train(cfg, overrides)
    if not cfg.get("pipeline"):  # a stage experiment: then evaluate.py on its outputs, as the README runs it
        from evaluate import evaluate

        ecfg, _ = compose_run("evaluate", [f"experiment={experiment}", *TINY], tmp_path / "evaluate",
                              tmp_path / "logs", tiny_cache)
        evaluate(ecfg)
    keys, run_tags = logged(tmp_path)
    workspace = dashboards.build_workspace(experiment)
    missing = {panel: sorted(set(wanted) - keys) for panel, wanted in dashboards.panel_keys(workspace)
               if set(wanted) - keys}
    assert not missing, f"panels read keys that no run of {experiment} logged: {missing}"
    # the workspace shows the runs that carry every tag of the experiment: each of its runs does
    wanted = {str(t) for t in cfg.tags}
    assert wanted and all(wanted <= tags for tags in run_tags), (wanted, run_tags)
    if experiment.startswith("selection_"):
        from anomgen.selection.model_selection import REAL_KEYS

        assert dashboards.SELECTION_BENCHMARKS == tuple(REAL_KEYS)
