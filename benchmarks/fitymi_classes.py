"""FITYMI over every class of a shipped dataset as the normal class: kNN on raw pixels, the backbone pretrained on
the other dataset without OE, with OE on a simple source (noise patches), and with OE on score-SDE fakes taken at
several FID bands (the paper's Table 4 in kind) and at the FID stop. Feeds the tables "FITYMI per class" of
``docs/results/fitymi.md`` (Animal-MNIST, the near-distribution task, and digits, the easy one) and "At the target".

    python benchmarks/fitymi_classes.py --experiment fitymi_animals \\
        --results benchmarks/results/fitymi_animals.jsonl \\
        --sde-extra callbacks.fid_early_stopping.num_samples=128 model.num_steps=50 trainer.max_epochs=30
    python benchmarks/fitymi_classes.py --experiment fitymi_digits --results benchmarks/results/fitymi_digits.jsonl

For each class:

1. ``train.py experiment=<experiment>`` (the FITYMI pipeline) with ``callbacks.fid_early_stopping.bands``
   (``--bands``): the score-SDE, a set exported the first time its FID check falls in each band, the set at the FID
   stop, OE on that last set and the kNN comparison (raw pixels, backbone without OE, backbone with OE);
2. the same pipeline with ``model=noise_patch`` (its sde stage makes noise patches): OE on them;
3. ``train.py experiment=<experiment> oe.set=<band set> '~pipeline.sde'`` for each band set: OE on it, kNN.

``--stop-only`` keeps step 1 alone, without bands: with ``--sde-extra
callbacks.fid_early_stopping.refine_every_n_steps=10`` the stop set lands near the target (5× the held-out FID)
instead of the 2× where checks every 50 steps overshoot to (its own ``--results`` file).

Each class's row (AUROC one-vs-rest, one-vs-one mean and closest, per detector; FID of each set) is appended to
``--results`` (JSON lines) as soon as it is complete, and classes already there are skipped, so an interrupted run
continues where it stopped. The summary of every row in the results file (mean of each figure over the classes that
have it, with their number; each set's FID also as a multiple of the class's held-out FID) is printed and written
next to the results (``<results>.summary.json``), with a markdown table. On a 2-core CPU a class takes 22–33 min on
Animal-MNIST and 5 min on digits.

``--doc PAGE`` (e.g. ``--doc docs/results/fitymi.md``, or just ``fitymi.md``) also rewrites the page's block
``<!-- begin: fitymi_classes <results stem> -->`` ... ``<!-- end: ... -->`` (``--doc-block`` names another) with
this command and the table of every row in the results file; the rest of the page is left as it is. Run it with the
arguments that made the rows: classes already in the results file are not run again, so when every class is there
it only rewrites the block (in seconds).

Rows written before the experiments were renamed ``<method>_<dataset>`` carry the old names (``animals_nearnd``,
``digits_nearnd``); they are read as the new ones (``RENAMED``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pipeline_runs import append_rows, read_rows, run_pipeline  # noqa: E402

KEYS = ("image_AUROC", "image_AUROC_one_vs_one_mean", "image_AUROC_one_vs_one_closest")
# per experiment: the classes (Animal-MNIST's closest pairs first) and pixel-FID bands that its checks every 50 steps
# fall into before the stop (Animal-MNIST: ~300, ~170, then ~55 at the stop; digits: ~21, ~12, then ~2)
EXPERIMENTS = {
    "fitymi_animals": {"classes": ("Dog", "Cat", "Sheep", "Cow", "Horse", "Giraffe", "Bear", "Bird", "Elephant",
                                   "Zebra"), "bands": ("200:", "100:200"),
                       "noise": ("model=noise_patch", "callbacks=default")},
    "fitymi_digits": {"classes": tuple(str(d) for d in range(10)), "bands": ("15:", "5:15"),
                      "noise": ("model=noise_patch", "callbacks=default")},
}
# the experiments' names before they were renamed <method>_<dataset>: rows in older results files carry them
RENAMED = {"animals_nearnd": "fitymi_animals", "digits_nearnd": "fitymi_digits"}


def parse_band(text: str) -> list:
    """``"100:200"`` -> [100, 200]; an empty side is open (``"200:"`` -> [200, None])."""
    lo, sep, hi = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"a band is LO:HI with either side optional, got {text!r}")
    return [float(lo) if lo else None, float(hi) if hi else None]


def run_train(log_dir: Path, *overrides: str) -> tuple[dict, Path]:
    """One ``train.py`` run (:func:`pipeline_runs.run_pipeline`); its metrics and run directory."""
    run_dir, metrics = run_pipeline(log_dir, *overrides)
    return metrics, run_dir


def run_device(extra: list[str]) -> str:
    """Where the runs go: the trainers' accelerator is ``auto`` unless an override sets it."""
    import torch

    if any(o.startswith("trainer.accelerator=") and o.split("=", 1)[1] == "cpu" for o in extra):
        return "cpu"
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def detector_figures(metrics: dict, detector: str, prefix: str) -> dict:
    return {f"{prefix}/{key}": metrics[f"evaluate/test/{detector}/{key}"] for key in KEYS}


def run_class(experiment: str, normal: str, work: Path, bands: list, extra: list[str], sde_extra: list[str],
              stop_only: bool = False, recipes: dict[str, list[str]] | None = None) -> dict:
    """One class's row; ``recipes`` (name -> overrides of the OE stage, e.g. ``oe.lr=1e-3``) adds an OE
    run on the stop set per recipe (``oe_recipe_<name>/...``), beside the pipeline's own OE (``oe_sde_stop/...``)."""
    from anomgen.data.synthetic import read_set_info
    from anomgen.pipeline import stage_output

    common = (f"experiment={experiment}", f"datamodule.normal_class={normal}", *extra)
    band_override = f"callbacks.fid_early_stopping.bands={json.dumps([] if stop_only else bands)}"
    sde, sde_dir = run_train(work, *common, *sde_extra, band_override)
    noise = None if stop_only else run_train(work, *common, *EXPERIMENTS[experiment]["noise"])[0]
    row = {"name": "fitymi_class", "experiment": experiment, "normal_class": normal, "device": run_device(extra),
           "sde_run": str(sde_dir / "sde"),
           "fid_at_stop": sde.get("sde/train/fid"), "fid_target": sde.get("sde/train/fid_target"),
           "fid_reference": sde.get("sde/train/fid_reference"),
           "num_exported": sde.get("sde/predict/num_exported"),
           **detector_figures(sde, "knn_pixels", "raw_pixels"),
           **detector_figures(sde, "backbone_without_oe", "no_oe"),
           **(detector_figures(noise, "backbone_with_oe", "oe_noise_patch") if noise else {}),
           **detector_figures(sde, "backbone_with_oe", "oe_sde_stop")}
    for band_set in sorted((sde_dir / "sde" / "fid_bands").glob("fid_*")):
        band, _ = run_train(work, *common, f"oe.set={band_set}", f"synthetic_sets.synthetic={band_set}",
                            "~pipeline.sde")
        row[f"fid/{band_set.name}"] = read_set_info(band_set).get("fid")
        row.update(detector_figures(band, "backbone_with_oe", f"oe_sde_{band_set.name}"))
    stop_set = stage_output("sde.synthetic_set", sde_dir) if recipes else None  # as the pipeline recorded it
    for name, overrides in (recipes or {}).items():
        oe, _ = run_train(work, *common, f"oe.set={stop_set}", f"synthetic_sets.synthetic={stop_set}",
                          "~pipeline.sde", *overrides)
        row[f"recipe/{name}"] = list(overrides)
        row.update(detector_figures(oe, "backbone_with_oe", f"oe_recipe_{name}"))
    return row


def parse_recipe(tokens: list[str]) -> tuple[str, list[str]]:
    """``--recipe NAME OVERRIDE...`` -> (name, overrides)."""
    name, *overrides = tokens
    if "=" in name or not overrides:
        raise argparse.ArgumentTypeError(f"--recipe takes a name, then the OE overrides, got {tokens}")
    return name, overrides


def held_out_fid(row: dict) -> float | None:
    """The class's reference FID (held-out real normals against the training normals): the row's ``fid_reference``,
    or, for rows written before it was logged, ``fid_target`` / ``target_factor`` of the SDE run's saved config when
    that run folder still exists."""
    if row.get("fid_reference") is not None:
        return row["fid_reference"]
    run = Path(str(row.get("sde_run", "")))
    config = next((c for c in (run / ".hydra" / "config.yaml", run.parent / ".hydra" / "config.yaml") if c.is_file()),
                  run / ".hydra" / "config.yaml")
    if row.get("fid_target") is None or not config.is_file():
        return None
    from omegaconf import OmegaConf

    factor = OmegaConf.select(OmegaConf.load(config), "callbacks.fid_early_stopping.target_factor")
    return row["fid_target"] / factor if factor else None


def with_fid_ratios(row: dict) -> dict:
    """The row plus ``fid_reference`` and each set's FID as a multiple of it (``fid_ratio/stop``,
    ``fid_ratio/<band>``): pixel FIDs of different datasets compare only in these units."""
    reference = held_out_fid(row)
    if reference is None:
        return row
    ratios = {"fid_ratio/stop": row["fid_at_stop"] / reference} if row.get("fid_at_stop") is not None else {}
    ratios.update({f"fid_ratio/{k[len('fid/'):]}": v / reference for k, v in row.items()
                   if k.startswith("fid/") and v is not None})
    return {**row, "fid_reference": reference, **ratios}


def summarize(rows: list[dict]) -> dict:
    """Mean of every numeric figure over the classes that have it (``n/<figure>``: how many)."""
    keys = dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, (int, float)))
    summary = {"name": "fitymi_mean", "experiment": rows[0]["experiment"] if rows else None,
               "classes": [r["normal_class"] for r in rows],
               "devices": sorted({r.get("device", "unknown") for r in rows})}
    for key in keys:
        values = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
        summary[key] = sum(values) / len(values)
        summary[f"n/{key}"] = len(values)
    return summary


def markdown_table(rows: list[dict], summary: dict) -> str:
    """One row per class (rows with their FID ratios, :func:`with_fid_ratios`): AUROC one-vs-rest / one-vs-one
    closest of each detector (the tables of docs/results/fitymi.md)."""
    columns = [("raw pixels", "raw_pixels"), ("ViT, no OE", "no_oe")]
    if any("oe_noise_patch/image_AUROC" in r for r in rows):  # absent from --stop-only results
        columns.append(("OE noise patches", "oe_noise_patch"))
    bands = sorted({k.split("/")[0][len("oe_sde_"):] for r in rows for k in r if k.startswith("oe_sde_fid_")},
                   key=lambda name: -summary[f"fid/{name}"])  # farthest from the data (highest mean FID) first

    def times_held_out(key: str) -> str:
        return f" (≈{summary[key]:.1f}×)" if isinstance(summary.get(key), (int, float)) else ""

    columns += [(f"OE SDE, {b.replace('fid_', 'FID ')}{times_held_out(f'fid_ratio/{b}')}", f"oe_sde_{b}")
                for b in bands]
    columns += [(f"OE SDE, FID stop{times_held_out('fid_ratio/stop')}", "oe_sde_stop")]
    recipes = dict.fromkeys(k.split("/")[0][len("oe_recipe_"):] for r in rows for k in r
                            if k.startswith("oe_recipe_"))
    columns += [(f"OE SDE stop, recipe {name}", f"oe_recipe_{name}") for name in recipes]

    def cell(r: dict, prefix: str) -> str:
        a, c = r.get(f"{prefix}/image_AUROC"), r.get(f"{prefix}/image_AUROC_one_vs_one_closest")
        return "–" if a is None else f"{a:.3f} / {c:.3f}"

    def fid_cell(r: dict) -> str:
        fid, ratio = r.get("fid_at_stop"), r.get("fid_ratio/stop")
        return "–" if fid is None else f"{fid:.1f}" + ("" if ratio is None else f" ({ratio:.1f}×)")

    from docpage import table

    return table(["normal class", "FID at stop (× held-out)", *(c for c, _ in columns)],
                 [[r["normal_class"], fid_cell(r), *(cell(r, p) for _, p in columns)]
                  for r in [*rows, {**summary, "normal_class": f"mean ({len(rows)} classes)"}]])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", choices=sorted(EXPERIMENTS), default="fitymi_animals")
    parser.add_argument("--classes", nargs="+", default=None, help="default: every class of the experiment's dataset")
    parser.add_argument("--results", default=None,
                        help="JSON-lines file of per-class rows: appended to, and classes already in it are skipped")
    parser.add_argument("--bands", nargs="*", type=parse_band, default=None,
                        help="FID bands LO:HI that export a set each (pixel FID; default: the experiment's, "
                             "see EXPERIMENTS)")
    parser.add_argument("--stop-only", action="store_true",
                        help="the SDE run alone (OE on its stop set): no noise-patch run, no band sets; e.g. with "
                             "--sde-extra callbacks.fid_early_stopping.refine_every_n_steps=10 for a stop at the "
                             "target itself")
    parser.add_argument("--recipe", action="append", nargs="+", default=[], metavar="NAME OVERRIDE",
                        help="an OE recipe to run on the stop set as well: a name, then overrides of the OE stage "
                             "(e.g. --recipe lr1e-3 oe.lr=1e-3 oe.epochs=10); repeat for several")
    parser.add_argument("--work-dir", default=None, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every run (e.g. debug=tiny)")
    parser.add_argument("--sde-extra", nargs="*", default=[],
                        help="more overrides for the SDE runs only (e.g. callbacks.fid_early_stopping.num_samples=128)")
    parser.add_argument("--doc", default=None,
                        help="a page of docs/results/ whose block of this results file is rewritten with the table")
    parser.add_argument("--doc-block", default=None,
                        help="the block's name (default: 'fitymi_classes <stem of --results>')")
    args = parser.parse_args(argv)
    try:
        recipes = dict(parse_recipe(tokens) for tokens in args.recipe)
    except argparse.ArgumentTypeError as err:
        parser.error(str(err))
    if args.doc and not args.results:
        parser.error("--doc needs --results: the table is made from the rows of a results file")
    defaults = EXPERIMENTS[args.experiment]
    classes = args.classes or list(defaults["classes"])
    bands = args.bands if args.bands is not None else [parse_band(b) for b in defaults["bands"]]
    results = Path(args.results) if args.results else None
    rows = read_rows(results) if results else []
    rows = [{**r, "experiment": RENAMED.get(r.get("experiment"), r.get("experiment"))} for r in rows]
    other = {r.get("experiment") for r in rows} - {args.experiment}
    if other:
        raise SystemExit(f"{results} holds rows of {sorted(map(str, other))}, not {args.experiment}: use another file")
    done = {r["normal_class"] for r in rows}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        for normal in classes:
            if normal in done:
                continue
            row = run_class(args.experiment, normal, work / "logs", bands, args.extra, args.sde_extra, args.stop_only,
                            recipes)
            print(json.dumps(row), flush=True)
            rows.append(row)
            if results:
                append_rows(results, [row])
    rows = [with_fid_ratios(r) for r in rows]
    summary = summarize(rows)  # every row of the results file, also when --classes named only some
    print(json.dumps(summary), flush=True)
    table = markdown_table(rows, summary)
    print(table)
    if results:
        results.with_suffix(".summary.json").write_text(json.dumps({"summary": summary, "table": table}, indent=2)
                                                        + "\n")
    if args.doc:
        from docpage import write_doc

        devices = ", ".join(summary["devices"])
        absolute = results.resolve()
        shown = absolute.relative_to(ROOT) if absolute.is_relative_to(ROOT) else results
        page = write_doc(args.doc, args.doc_block or f"fitymi_classes {results.stem}", "fitymi_classes.py",
                         sys.argv[1:] if argv is None else argv, table,
                         f"Rows: `{shown}` ({len(rows)} classes; device: {devices}).\nCells: AUROC one-vs-rest / "
                         "one-vs-one closest.")
        print(f"wrote {page}", file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
