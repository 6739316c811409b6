"""W&B workspaces, one per method, defined in code (``wandb-workspaces``): the panels a user would otherwise build by
hand, on the keys the runs log.

    python -m anomgen.dashboards fitymi_digits --dry-run            # the workspace as JSON, offline
    python -m anomgen.dashboards fitymi_digits --entity E --project P   # publish it (needs `wandb login`)

Every experiment of a method gets its method's workspace, its keys filled in from the experiment's composed config
(detector names, synthetic-set names, selection sets, the quality key):

- FITYMI (``fitymi_*``): the FID curve of the score-SDE stage with its target, the reference FID and the checks that
  exported an FID band set; the sample grid of every check; the OE stage's losses; the AUROC table and bars of the
  evaluate stage.
- selection (``selection_*``): the real-vs-synthetic scatter plots, the rank-agreement table (Spearman, Kendall,
  top-1, regret per set, K and benchmark) and the mean real AUROC table, top-1 and regret bars (K = all), the grids
  of the validation sets.
- EAP (``eap_digits``): the histogram of the quality scores, the kept and the dropped anomalies, the exported set and
  the AUROC of the kept set against the whole set.
- localizer (``localizer_mvtec``, ``anomalydiffusion_*``): the validation pixel and image metrics over training,
  the predicted maps, the test split's pixel metrics; for AnomalyDiffusion also the generated pairs, their generation
  metrics and the defect-type classifier's accuracy.

A pipeline logs one W&B run per stage; the workspace shows the project's runs that carry every tag of the
experiment (``tags:`` of its config), whichever stage logged them. Nothing here logs in or touches the network but
:func:`publish`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

from anomgen.errors import ConfigError

#: experiment name -> method (a prefix ending in ``_`` matches every experiment that starts with it)
METHOD_OF = {"fitymi_": "fitymi", "selection_": "selection", "eap_digits": "eap", "localizer_mvtec": "localizer",
             "anomalydiffusion_": "localizer"}
#: the real benchmarks of model selection (``anomgen.selection.model_selection.REAL_KEYS``, not imported here: that
#: module brings torch; tests/test_dashboards.py holds them equal)
SELECTION_BENCHMARKS = ("image_AUROC", "image_AUROC_one_vs_one_mean", "image_AUROC_one_vs_one_closest")
#: the test split's pixel metrics of a detector with anomaly maps (evaluate.PIXEL_TABLE_KEYS)
PIXEL_KEYS = ("pixel_AUROC", "pixel_AP", "pixel_F1Max", "pixel_AUPRO")
STEP = "trainer/global_step"  # Lightning's step metric in W&B


def repo_root() -> Path:
    """The folder that holds ``configs/`` (``ANOMGEN_ROOT``, else this checkout)."""
    root = Path(os.environ.get("ANOMGEN_ROOT") or Path(__file__).resolve().parents[1])
    if not (root / "configs" / "experiment").is_dir():
        raise ConfigError(f"no configs/experiment under {root}: run from a checkout of anomgen or set ANOMGEN_ROOT")
    return root


def method_of(experiment: str) -> str | None:
    for prefix, method in METHOD_OF.items():
        if experiment == prefix or (prefix.endswith("_") and experiment.startswith(prefix)):
            return method
    return None


def known_experiments() -> list[str]:
    """The experiments (``configs/experiment/*.yaml``) that have a workspace."""
    names = sorted(p.stem for p in (repo_root() / "configs" / "experiment").glob("*.yaml"))
    return [n for n in names if method_of(n)]


def experiment_config(experiment: str):
    """``train.yaml`` composed with ``experiment=<experiment>`` (interpolations left unresolved)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    known = known_experiments()
    if experiment not in known:
        raise ConfigError(f"no workspace for experiment {experiment!r}; known experiments: {', '.join(known)}")
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(repo_root() / "configs"), version_base="1.3"):
            return compose(config_name="train", overrides=[f"experiment={experiment}"])
    finally:
        GlobalHydra.instance().clear()


# -- what the experiment's runs are called in its config ------------------------------------------------------------
def detector_names(cfg) -> dict[str, str]:
    """Detector name -> ``_target_``, as ``evaluate.named_detectors`` names them."""
    out = {}
    if cfg.get("detector"):
        out[cfg.detector.get("name") or "detector"] = str(cfg.detector.get("_target_"))
    for name, detector in (cfg.get("detectors") or {}).items():
        if detector is not None:
            out[str(name)] = str(detector.get("_target_"))
    return out


def set_names(cfg) -> list[str]:
    """The names of the synthetic sets evaluate.py scores (``synthetic_sets``)."""
    return [str(name) for name in (cfg.get("synthetic_sets") or {})]


def _file_part(name: str) -> str:  # anomgen.selection.report._file_part: the scatter files' names
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "set"


# -- panels -----------------------------------------------------------------------------------------------------------
def _panels():
    import wandb_workspaces.reports.v2 as wr

    return wr


def _auroc_panels(cfg, wr, sources: list[str]) -> list:
    """The detector table of evaluate.py and image AUROC bars per source (``test`` and the synthetic sets)."""
    names = list(detector_names(cfg))
    panels = [wr.WeavePanelSummaryTable(table_name="summary/auroc", layout=wr.Layout(w=24, h=8))]
    for source in sources:
        what = "real test split" if source == "test" else f"synthetic set {source!r}"
        panels.append(wr.BarPlot(title=f"image AUROC, {what}", metrics=[f"{source}/{n}/image_AUROC" for n in names],
                                 orientation="h"))
    return panels


def fitymi_sections(cfg) -> list:
    import wandb_workspaces.workspaces as ws

    wr = _panels()
    return [
        ws.Section(name="FID early stopping (sde stage)", is_open=True, panels=[
            wr.LinePlot(title="FID: curve, target, held-out reference, band exports", x=STEP,
                        y=["train/fid", "train/fid_target", "train/fid_reference", "train/fid_band_export"]),
            wr.MediaBrowser(title="samples at every FID check", media_keys=["train/fid_samples"], gallery_axis="step"),
            wr.LinePlot(title="score-SDE loss", x=STEP, y=["train/loss"]),
            wr.MediaBrowser(title="exported set", media_keys=["predict/generated"]),
        ]),
        ws.Section(name="Outlier exposure (oe stage)", is_open=True, panels=[
            wr.LinePlot(title="OE loss", x=STEP, y=["train/loss", "val/loss"]),
        ]),
        ws.Section(name="AUROC (evaluate stage)", is_open=True, panels=[
            *_auroc_panels(cfg, wr, ["test", *set_names(cfg)]),
            wr.WeavePanelSummaryTable(table_name="test/auroc_per_out_class", layout=wr.Layout(w=24, h=8)),
        ]),
    ]


def selection_sections(cfg) -> list:
    import wandb_workspaces.workspaces as ws

    wr = _panels()
    sel = cfg.selection
    sets = [str(s) for s in (sel.get("sets") or {})]
    sections = []
    if sel.get("candidates") or sel.get("extractors"):  # model selection (evaluate.model_selection)
        scatter = [wr.MediaBrowser(title=f"real vs synthetic AUROC per candidate ({vs})", num_columns=3,
                                   media_keys=[f"selection/scatter_{_file_part(vs)}_{_file_part(b)}"
                                               for b in SELECTION_BENCHMARKS])
                   for vs in sets]
        agreement = [
            wr.WeavePanelSummaryTable(table_name="selection/rank_agreement", layout=wr.Layout(w=24, h=10)),
            wr.WeavePanelSummaryTable(table_name="selection/mean_real_auroc", layout=wr.Layout(w=24, h=8)),
        ]
        # Spearman and Kendall are in the table: their bars would be empty wherever they are undefined (tied
        # AUROCs give NaN, which evaluate.py leaves out of the logged numbers)
        for stat in ("top1_rate", "regret_mean"):
            agreement.append(wr.BarPlot(title=f"{stat}, K = all", orientation="h", metrics=[
                f"selection/{vs}/Kall/{b}/{stat}" for vs in sets for b in SELECTION_BENCHMARKS]))
        sections += [ws.Section(name="Real vs synthetic", is_open=True, panels=scatter),
                     ws.Section(name="Rank agreement", is_open=True, panels=agreement)]
    sections.append(ws.Section(name="Validation sets (first task)", is_open=True, panels=[
        wr.MediaBrowser(title=f"set {vs!r}", media_keys=[f"selection/grid_{vs}"]) for vs in sets]))
    return sections


def eap_sections(cfg) -> list:
    import wandb_workspaces.workspaces as ws

    wr = _panels()
    key = str(cfg.quality.key)
    return [
        ws.Section(name=f"Quality scores ({key})", is_open=True, panels=[
            wr.MediaBrowser(title=f"{key} scores of the set's anomalies, kept part in red",
                            media_keys=[f"quality/{key}_histogram"]),
            wr.MediaBrowser(title="kept anomalies (best first)", media_keys=[f"quality/{key}_kept"]),
            wr.MediaBrowser(title="dropped anomalies (worst first)", media_keys=[f"quality/{key}_dropped"]),
            wr.BarPlot(title="kept anomalies, lowest kept score", orientation="h",
                       metrics=[f"quality/{key}_kept", f"quality/{key}_min_kept"]),
            wr.MediaBrowser(title="exported set", media_keys=["predict/generated"]),
        ]),
        ws.Section(name="Kept set vs whole set (evaluate.py)", is_open=True,
                   panels=_auroc_panels(cfg, wr, ["test", *set_names(cfg)])),
    ]


def localizer_sections(cfg) -> list:
    import wandb_workspaces.workspaces as ws

    wr = _panels()
    localizers = [n for n, target in detector_names(cfg).items() if target.endswith("UNetLocalizer")]
    sections = [ws.Section(name="Localizer training (validation: held-out normals + generated pairs)", is_open=True,
                           panels=[
        wr.LinePlot(title="validation pixel metrics", x=STEP, y=["val/pixel_AUROC", "val/pixel_AP"]),
        wr.LinePlot(title="validation image metrics", x=STEP, y=["val/image_AUROC", "val/image_AP"]),
        wr.LinePlot(title="focal loss", x=STEP, y=["train/loss", "val/loss"]),
        wr.MediaBrowser(title="predicted maps (image, true mask, map)", media_keys=["val/predicted_maps"],
                        gallery_axis="step"),
    ])]
    test = [wr.BarPlot(title=f"pixel metrics of {n}, real test split", orientation="h",
                       metrics=[f"test/{n}/{k}" for k in PIXEL_KEYS]) for n in localizers]
    test += [wr.BarPlot(title=f"image metrics of {n}, real test split", orientation="h",
                        metrics=[f"test/{n}/image_AUROC", f"test/{n}/image_AP"]) for n in localizers]
    test.append(wr.WeavePanelSummaryTable(table_name="summary/auroc", layout=wr.Layout(w=24, h=8)))
    sections.append(ws.Section(name="Pixel metrics (evaluate stage)", is_open=True, panels=test))
    pipeline = cfg.get("pipeline") or {}
    if "generate" in pipeline:  # AnomalyDiffusion: the pairs, their generation metrics, the defect-type classifier
        generation = list((cfg.get("generation_metrics") or {}).get("sets") or [])
        panels = [wr.MediaBrowser(title="generated image-mask pairs", media_keys=["predict/generated"])]
        panels += [wr.BarPlot(title=f"generation metrics of {s!r}", orientation="h",
                              metrics=[f"generation/{s}/inception_score", f"generation/{s}/ic_lpips"])
                   for s in generation]
        if "classifier" in pipeline:
            panels.append(wr.LinePlot(title="defect-type classifier", x=STEP,
                                      y=["train/defect_type_accuracy", "val/defect_type_accuracy"]))
            panels.append(wr.ScalarChart(title="defect-type accuracy, test split", metric="test/defect_type_accuracy"))
        sections.append(ws.Section(name="Generated pairs", is_open=True, panels=panels))
    return sections


SECTIONS = {"fitymi": fitymi_sections, "selection": selection_sections, "eap": eap_sections,
            "localizer": localizer_sections}
TITLES = {"fitymi": "FITYMI", "selection": "synthetic validation (selection)", "eap": "EAP",
          "localizer": "U-Net localizer"}


def build_workspace(experiment: str, entity: str = "ENTITY", project: str = "anomgen", cfg=None):
    """The workspace of ``experiment`` (built offline; :func:`publish` saves it)."""
    import wandb_workspaces.workspaces as ws

    cfg = cfg if cfg is not None else experiment_config(experiment)
    method = method_of(experiment)
    tags = [str(t) for t in (cfg.get("tags") or [])]
    return ws.Workspace(
        entity=entity, project=project, name=f"anomgen {TITLES[method]}: {experiment}",
        sections=SECTIONS[method](cfg),
        runset_settings=ws.RunsetSettings(filters=[ws.Tags("tags").isin([t]) for t in tags]),
    )


def panel_keys(workspace) -> list[tuple[str, list[str]]]:
    """``(section / panel title, [every logged key it reads])`` for every panel: line and bar metrics (and a line
    plot's x-axis), media keys, table names."""
    out = []
    for section in workspace.sections:
        for panel in section.panels:
            keys = []
            for attr in ("y", "metrics", "media_keys"):
                keys += [str(k) for k in getattr(panel, attr, None) or []]
            for attr in ("table_name", "metric"):
                if getattr(panel, attr, None):
                    keys.append(str(getattr(panel, attr)))
            if getattr(panel, "x", None) not in (None, "Step"):
                keys.append(str(panel.x))
            title = getattr(panel, "title", None) or f"table {getattr(panel, 'table_name', '')}"
            out.append((f"{section.name} / {title}", keys))
    return out


def workspace_json(workspace) -> dict:
    """What :func:`publish` would send (the view W&B stores), as plain JSON."""
    return workspace._to_model().model_dump(mode="json", by_alias=True, exclude_none=True)


def publish(workspace):
    """Save the workspace to W&B (needs the network and ``wandb login``); returns it, with its URL."""
    return workspace.save()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m anomgen.dashboards", description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", help="an experiment name (configs/experiment), e.g. fitymi_digits")
    parser.add_argument("--dry-run", action="store_true", help="print the workspace as JSON; publish nothing")
    parser.add_argument("--entity", help="W&B entity (user or team) to publish to")
    parser.add_argument("--project", default=None, help="W&B project to publish to (the logger's: anomgen)")
    args = parser.parse_args(argv)
    try:
        if not args.dry_run and not args.entity:
            raise ConfigError("give --entity (and --project) to publish, or --dry-run to print the workspace")
        workspace = build_workspace(args.experiment, args.entity or "ENTITY", args.project or "anomgen")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps(workspace_json(workspace), indent=2))
        return 0
    print(publish(workspace).url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
