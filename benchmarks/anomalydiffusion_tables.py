"""AnomalyDiffusion's tables in the shape of the paper's Tables 1-4, one ``train.py experiment=anomalydiffusion_mvtec``
(or ``_visa``) pipeline run per category:

- Table 1, generation: Inception Score and IC-LPIPS of the generated pairs (``generation/anomalydiffusion/...``);
- Table 2, localization: the U-Net localizer's pixel AUROC / AP / F1-max / AUPRO on the real test split;
- Table 3, detection: its image AUROC / AP / F1-max;
- Table 4, classification: the defect-type classifier's accuracy on the real test anomalies.

    python benchmarks/anomalydiffusion_tables.py --experiment anomalydiffusion_mvtec \\
        --results benchmarks/results/anomalydiffusion_mvtec.jsonl --doc anomalydiffusion.md     # GPU, weights, data
    python benchmarks/anomalydiffusion_tables.py --experiment anomalydiffusion_mvtec --tiny --categories bottle \\
        --results benchmarks/results/anomalydiffusion_mvtec_tiny.jsonl --doc anomalydiffusion.md  # plumbing

Each category's row (every figure above, from the run's metrics) is appended to ``--results`` (JSON lines) as soon as
its run ends; categories already there are skipped, so an interrupted grid continues. The real grid needs the MVTec
AD / VisA layout (``paths.mvtec_dir`` / ``paths.visa_dir``), the weights of ``pretrained=paper`` (the LDM
txt2img-f8, Inception-v3, LPIPS-AlexNet, ResNet-34) and a GPU. Every checkpoint here is picked on held-out
*generated* pairs; the paper's figures (the last row of each table) were picked on the test set. ``--tiny`` runs
``debug=tiny`` (tiny random models on a tiny written copy of the layout): rows carry ``"plumbing": true`` and the page
says so. ``--doc PAGE`` rewrites the block ``<!-- begin: anomalydiffusion_tables <results stem> -->`` of the page.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pipeline_runs import append_rows, read_rows, run_pipeline  # noqa: E402

#: the tables' columns: (metric key in the run's metrics.json, column name)
TABLE1 = (("evaluate/generation/anomalydiffusion/inception_score", "IS"),
          ("evaluate/generation/anomalydiffusion/ic_lpips", "IC-LPIPS"))
TABLE2 = (("evaluate/test/unet_localizer/pixel_AUROC", "AUROC"), ("evaluate/test/unet_localizer/pixel_AP", "AP"),
          ("evaluate/test/unet_localizer/pixel_F1Max", "F1-max"), ("evaluate/test/unet_localizer/pixel_AUPRO", "PRO"))
TABLE3 = (("evaluate/test/unet_localizer/image_AUROC", "AUROC"), ("evaluate/test/unet_localizer/image_AP", "AP"),
          ("evaluate/test/unet_localizer/image_F1Max", "F1-max"))
TABLE4 = (("classifier/test/defect_type_accuracy", "accuracy"),)
TABLES = (("Table 1: generation (generated pairs)", TABLE1, False),
          ("Table 2: localization, pixel level (%)", TABLE2, True),
          ("Table 3: detection, image level (%)", TABLE3, True),
          ("Table 4: defect-type classification accuracy on the real test anomalies (%)", TABLE4, True))
#: the paper's MVTec figures (METHODS.md §4): means over the categories
PAPER = {"anomalydiffusion_mvtec": {"IS": 1.80, "IC-LPIPS": 0.32, "pixel": (99.1, 81.4, 76.3, 94.0),
                                    "image": (99.2, 99.7, 98.7), "accuracy": 66.1}}


def categories(experiment: str) -> list[str]:
    from anomgen.data.mvtec import MVTEC_CATEGORIES
    from anomgen.data.visa import VISA_CATEGORIES

    return list(MVTEC_CATEGORIES if experiment == "anomalydiffusion_mvtec" else VISA_CATEGORIES)


def run_one(experiment: str, category: str, tiny: bool, extra: list[str], work: Path) -> dict:
    overrides = [f"experiment={experiment}", f"datamodule.dataset.category={category}",
                 *(["debug=tiny"] if tiny else []), *extra]
    _, metrics = run_pipeline(work, *overrides)
    keys = [key for _, table, _ in TABLES for key, _ in table]
    return {"experiment": experiment, "category": category, "plumbing": tiny, "extra": extra,
            "metrics": {key: metrics.get(key) for key in keys}}


def _cell(value, percent: bool) -> str:
    if value is None:
        return ""
    return f"{100 * value:.1f}" if percent else f"{value:.2f}"


def tables(rows: list[dict], experiment: str) -> str:
    """The four tables: one row per category, then the mean over categories, then the paper's means (MVTec)."""
    from docpage import table

    rows = [r for r in rows if r["experiment"] == experiment]
    if not rows:
        return "(no rows yet)"
    out = []
    if any(r.get("plumbing") for r in rows):
        out.append("**Plumbing, not results:** these rows come from `debug=tiny` (tiny random models on a tiny "
                   "written copy of the layout). They show that every stage runs and writes its files.\n")
    paper = PAPER.get(experiment)
    if paper is not None:
        out.append("The paper's localizer and classifier figures (its rows below) were picked on the test set; every "
                   "checkpoint here is picked on held-out generated pairs.\n")
    paper_rows = {} if paper is None else {
        "Table 1": [paper["IS"], paper["IC-LPIPS"]], "Table 2": list(paper["pixel"]), "Table 3": list(paper["image"]),
        "Table 4": [paper["accuracy"]]}
    for title, columns, percent in TABLES:
        body = [[r["category"], *(_cell(r["metrics"].get(key), percent) for key, _ in columns)] for r in rows]
        means = []
        for key, _ in columns:
            values = [r["metrics"].get(key) for r in rows if r["metrics"].get(key) is not None]
            means.append(_cell(statistics.mean(values), percent) if values else "")
        body.append(["**mean**", *means])
        if title.split(":")[0] in paper_rows:
            body.append(["paper (mean)", *paper_rows[title.split(":")[0]]])
        out.append(f"{title}:\n")
        out.append(table(["category", *(name for _, name in columns)], body))
        out.append("")
    return "\n".join(out).rstrip("\n")


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="anomalydiffusion_mvtec",
                        choices=["anomalydiffusion_mvtec", "anomalydiffusion_visa"])
    parser.add_argument("--categories", nargs="*", default=None, help="default: every category of the dataset")
    parser.add_argument("--tiny", action="store_true", help="debug=tiny: plumbing rows, not results")
    parser.add_argument("--extra", nargs="*", default=[], help="more train.py overrides for every run")
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--doc", default=None, help="a page of docs/results/ whose block is rewritten")
    args = parser.parse_args(argv)

    rows = read_rows(args.results)
    done = {(r["experiment"], r["category"], r.get("plumbing", False)) for r in rows}
    with tempfile.TemporaryDirectory(prefix="anomalydiffusion_tables_") as work:
        for category in args.categories or categories(args.experiment):
            if (args.experiment, category, args.tiny) in done:
                continue
            print(f"{args.experiment} {category} ...", flush=True)
            row = run_one(args.experiment, category, args.tiny, args.extra, Path(work))
            append_rows(args.results, [row])
            rows.append(row)
    text = tables(rows, args.experiment)
    print(text)
    if args.doc:
        from docpage import write_doc

        write_doc(args.doc, f"anomalydiffusion_tables {args.results.stem}", "anomalydiffusion_tables.py",
                  argv if argv is not None else sys.argv[1:], text)
    return text


if __name__ == "__main__":
    main()
