"""ADP's tables: image AUROC per category for K normal shots × seeds (the paper's Table 1: WinCLIP+, ADP, ADP_l) and
the ablation at K = 4 (its Table 2: TI, c_n, c_a, ADP), from ``train.py experiment=adp_mvtec`` / ``adp_visa`` runs.

    python benchmarks/adp_table.py --experiment adp_mvtec --results benchmarks/results/adp_mvtec.jsonl \\
        --doc adp.md
    python benchmarks/adp_table.py --experiment adp_mvtec --tiny --categories bottle --shots 2 --seeds 0 1 \\
        --results benchmarks/results/adp_mvtec_tiny.jsonl --doc adp.md    # plumbing: tiny random weights

Each (category, K, seed) is one pipeline run (``adp.k_shot=K datamodule.support_seed=seed seed=seed``: the shots and
every stage's randomness change with the seed); its row (``image_AUROC`` of every detector of the evaluate stage) is
appended to ``--results`` (JSON lines) as soon as the run ends, and combinations already there are skipped, so an
interrupted grid continues where it stopped. The real grid needs the MVTec AD / VisA layouts and the weights of
``pretrained=paper`` (SD 2.1 and two open_clip models) and a GPU: about 3 concept stages × ``adp.steps`` steps at
768 px per run.

``--tiny`` runs ``debug=tiny`` (tiny random models on a tiny written copy of the layout): rows carry
``"plumbing": true`` and the page says so above the tables. Those figures show that the pipeline runs, nothing about
ADP. ``--doc PAGE`` rewrites the block ``<!-- begin: adp_table <results stem> -->`` of the page.
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

#: Table 1's detectors and Table 2's, as the evaluate stage names them
TABLE1 = ("winclip_plus", "adp", "adp_l")
TABLE2 = ("ti", "c_n", "c_a", "adp")
NAMES = {"winclip_plus": "WinCLIP+", "adp": "ADP", "adp_l": "ADP_l", "ti": "TI", "c_n": "c_n", "c_a": "c_a"}
#: the paper's figures (METHODS.md §3), for the row under each table
PAPER_TABLE1 = {"adp_mvtec": {"winclip_plus": 94.8, "adp": 97.1, "adp_l": 97.0},
                "adp_visa": {"winclip_plus": 85.0, "adp": 89.7, "adp_l": 90.1}}
PAPER_TABLE2 = {"adp_mvtec": {"ti": 88.6, "c_n": 95.9, "c_a": 95.2, "adp": 96.0},
                "adp_visa": {"ti": 78.5, "c_n": 87.1, "c_a": 85.3, "adp": 87.7}}


def categories(experiment: str) -> list[str]:
    from anomgen.data.mvtec import MVTEC_CATEGORIES
    from anomgen.data.visa import VISA_CATEGORIES

    return list(MVTEC_CATEGORIES if experiment == "adp_mvtec" else VISA_CATEGORIES)


def run_one(experiment: str, category: str, k: int, seed: int, tiny: bool, extra: list[str], work: Path) -> dict:
    overrides = [f"experiment={experiment}", f"datamodule.dataset.category={category}", f"adp.k_shot={k}",
                 f"datamodule.support_seed={seed}", f"seed={seed}", *(["debug=tiny"] if tiny else []), *extra]
    _, metrics = run_pipeline(work, *overrides)
    auroc = {d: metrics.get(f"evaluate/test/{d}/image_AUROC") for d in dict.fromkeys(TABLE1 + TABLE2)}
    return {"experiment": experiment, "category": category, "k": k, "seed": seed, "plumbing": tiny,
            "extra": extra, "image_AUROC": auroc}


def _mean_std(values: list[float]) -> str:
    values = [100 * v for v in values if v is not None]
    if not values:
        return ""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def tables(rows: list[dict], experiment: str) -> str:
    """Table 1 (per category and K: mean ± std over the seeds, then the mean over categories) and Table 2 (K = 4,
    or the smallest K there is: the mean over categories and seeds)."""
    from docpage import table

    rows = [r for r in rows if r["experiment"] == experiment]
    if not rows:
        return "(no rows yet)"
    out = []
    if any(r.get("plumbing") for r in rows):
        out.append("**Plumbing, not results:** these rows come from `debug=tiny` (tiny random models on a tiny "
                   "written copy of the layout). They show that every stage runs and writes its files.\n")
    shots = sorted({r["k"] for r in rows})
    cats = list(dict.fromkeys(r["category"] for r in rows))
    body = []
    for k in shots:
        for c in cats:
            seeds = [r for r in rows if r["k"] == k and r["category"] == c]
            if seeds:
                body.append([k, c, len(seeds), *(_mean_std([r["image_AUROC"].get(d) for r in seeds])
                                                  for d in TABLE1)])
        per_cat = {d: [statistics.mean([r["image_AUROC"][d] for r in rows if r["k"] == k and r["category"] == c
                                        and r["image_AUROC"].get(d) is not None] or [float("nan")])
                       for c in cats] for d in TABLE1}
        body.append([k, "**mean**", "", *(f"{100 * statistics.mean(v):.1f}" for v in per_cat.values())])
    paper = PAPER_TABLE1.get(experiment)
    if paper:
        body.append([16, "paper (mean)", "", *(paper[d] for d in TABLE1)])
    out.append("Image AUROC (%), mean ± std over the seeds:\n")
    out.append(table(["K", "category", "seeds", *(NAMES[d] for d in TABLE1)], body))
    k2 = 4 if 4 in shots else shots[0]
    ablation = [r for r in rows if r["k"] == k2]
    means = [_mean_std([r["image_AUROC"].get(d) for r in ablation]) for d in TABLE2]
    abl = [[k2, len(ablation), *means]]
    paper2 = PAPER_TABLE2.get(experiment)
    if paper2:
        abl.append([4, "paper", *(paper2[d] for d in TABLE2)])
    out.append(f"\nAblation at K = {k2} (mean ± std over every category and seed):\n")
    out.append(table(["K", "runs", *(NAMES[d] for d in TABLE2)], abl))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="adp_mvtec", choices=("adp_mvtec", "adp_visa"))
    parser.add_argument("--categories", nargs="*", default=None, help="default: every category of the dataset")
    parser.add_argument("--shots", nargs="*", type=int, default=[2, 4, 8, 16])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--tiny", action="store_true", help="debug=tiny: plumbing rows, not results")
    parser.add_argument("--extra", nargs="*", default=[], help="more train.py overrides for every run")
    parser.add_argument("--results", type=Path, required=True)
    parser.add_argument("--doc", default=None, help="a page of docs/results/ whose adp_table block is rewritten")
    args = parser.parse_args(argv)

    rows = read_rows(args.results)
    done = {(r["experiment"], r["category"], r["k"], r["seed"], r.get("plumbing", False)) for r in rows}
    cats = args.categories or categories(args.experiment)
    with tempfile.TemporaryDirectory(prefix="adp_table_") as work:
        for category in cats:
            for k in args.shots:
                for seed in args.seeds:
                    if (args.experiment, category, k, seed, args.tiny) in done:
                        continue
                    print(f"{args.experiment} {category} K={k} seed={seed} ...", flush=True)
                    row = run_one(args.experiment, category, k, seed, args.tiny, args.extra, Path(work))
                    append_rows(args.results, [row])
                    rows.append(row)
    text = tables(rows, args.experiment)
    print(text)
    if args.doc:
        from docpage import write_doc

        write_doc(args.doc, f"adp_table {args.results.stem}", "adp_table.py",
                  argv if argv is not None else sys.argv[1:], text)
    return text


if __name__ == "__main__":
    main()
