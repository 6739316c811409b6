"""Tables of model-selection runs side by side (e.g. ``experiment=selection_animals`` with a DDPM trained on digits
and one trained on Animal-MNIST, each at DiffStyle's paper settings and with a stronger edit). Feeds the section
"Synthetic validation on Animal-MNIST" of ``docs/results/selection.md``.

    python benchmarks/selection_runs.py --results benchmarks/results/selection_animals.jsonl \\
        --run "digits DDPM, paper settings=logs/train/runs/<run>" --run "..." --doc selection.md

Each ``--run LABEL=RUN_FOLDER`` reads the run's ``evaluate/selection/selection.json`` (or ``selection/selection.json``
under the folder given), summarises its per-task results again (:func:`anomgen.selection.model_selection.summarize`,
so rows carry every figure of the current summary) and appends one row per run to ``--results`` (JSON lines; a
label already there is replaced by the new row). The tables are made from every row of the results file:

- agreement per validation set and K (one-vs-rest AUROC): mean Spearman and Kendall over the tasks, top-1 rate,
  mean regret, mean |synthetic − real| AUROC over candidates and tasks, Spearman of the per-candidate means;
- per candidate: mean real AUROC and, per run and validation set, mean synthetic − real AUROC (K = all).

``--doc PAGE`` rewrites the page's blocks ``selection_runs agreement`` and ``selection_runs gap``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from pipeline_runs import read_rows  # noqa: E402

BENCHMARK = "image_AUROC"
KEEP = ("tasks", "candidates", "validation_sets", "k", "mean_real", "mean_synthetic", "gap", "abs_gap", "agreement")


def selection_file(run: Path) -> Path:
    for candidate in (run / "evaluate" / "selection" / "selection.json", run / "selection" / "selection.json",
                      run / "selection.json"):
        if candidate.is_file():
            return candidate
    raise SystemExit(f"{run}: no selection/selection.json (give a train.py run folder of a selection experiment, "
                     "or its evaluate folder)")


def read_run(label: str, run: Path) -> dict:
    """One row: the run's per-task results summarised again, and the run's settings that tell runs apart."""
    from anomgen.selection.model_selection import summarize

    data = json.loads(selection_file(run).read_text())
    summary = summarize(data["tasks"])
    row = {"name": "selection_run", "label": label, "run": str(run), **{k: summary[k] for k in KEEP}}
    config = run / ".hydra" / "config.yaml"
    if config.is_file():
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(config)
        row["ddpm_dataset"] = OmegaConf.select(cfg, "ddpm_dataset")
        row["ddpm_steps"] = OmegaConf.select(cfg, "ddpm_steps")
    return row


def _num(value) -> str:
    return "n/a" if value is None or value != value else f"{value:.2f}"


def agreement_table(rows: list[dict]) -> str:
    from docpage import table

    lines, shared = [], {}  # shared: (set, K) -> cells of a set that is the same in every run, tabled last
    for row in rows:
        for vs in row["validation_sets"]:
            for k in row["k"]:
                a = row["agreement"][vs][k][BENCHMARK]
                top1 = round(a["top1_rate"] * len(row["tasks"]))
                cells = [vs, k, _num(a["spearman"]), _num(a["kendall"]), f"{top1} / {len(row['tasks'])}",
                         f"{a['regret']:.3f}", f"{a['abs_gap']:.3f}", _num(a["dataset"]["spearman"]),
                         "yes" if a["dataset"]["top1_agreement"] else "no"]
                if len(rows) > 1 and all(other["agreement"].get(vs, {}).get(k) == row["agreement"][vs][k]
                                         for other in rows):
                    shared[vs, k] = ["every run", *cells]  # a baseline that does not depend on the run
                else:
                    lines.append([row["label"], *cells])
    lines += list(shared.values())
    return table(["run", "validation set", "K", "mean Spearman", "mean Kendall", "top-1", "mean regret",
                  "mean abs(syn − real)", "Spearman of means", "top-1 on means"], lines)


def gap_table(rows: list[dict], k: str = "all") -> str:
    """Per candidate: mean real AUROC, then mean synthetic − real per run and validation set (K = ``k``)."""
    from docpage import table

    candidates = rows[0]["candidates"]
    columns = []  # (label, row, set): a set that is the same in every run (a baseline) gets one column
    for vs in dict.fromkeys(vs for row in rows for vs in row["validation_sets"]):
        having = [row for row in rows if vs in row["validation_sets"]]
        if len(rows) > 1 and len(having) == len(rows) and all(r["gap"][vs] == rows[0]["gap"][vs] for r in rows):
            columns.append((f"{vs} (every run)", rows[0], vs))
        else:
            columns += [(f"{row['label']}: {vs}", row, vs) for row in having]
    header = ["candidate", "real AUROC", *(label for label, _, _ in columns)]
    body = [[c, f"{rows[0]['mean_real'][BENCHMARK][c]:.3f}",
             *(f"{row['gap'][vs][k][BENCHMARK][c]:+.3f}" for _, row, vs in columns)] for c in candidates]
    return table(header, body)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", default=[], metavar="LABEL=RUN_FOLDER")
    parser.add_argument("--results", required=True, help="JSON-lines file of one row per run (appended to)")
    parser.add_argument("--doc", default=None, help="a page of docs/results/ whose blocks are rewritten")
    args = parser.parse_args(argv)
    results = Path(args.results)
    rows = read_rows(results)
    for spec in args.run:
        label, sep, folder = spec.partition("=")
        if not sep or not label or not folder:
            parser.error(f"--run takes LABEL=RUN_FOLDER, got {spec!r}")
        new = read_run(label, Path(folder))
        labels = [r["label"] for r in rows]
        rows = [new if r["label"] == label else r for r in rows] if label in labels else [*rows, new]
    if not rows:
        parser.error(f"{results} has no row and no --run was given")
    first = rows[0]
    for row in rows[1:]:
        if row["candidates"] != first["candidates"] or row["tasks"] != first["tasks"]:
            raise SystemExit(f"run {row['label']!r} has other candidates or tasks than {first['label']!r}")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    agreement, gaps = agreement_table(rows), gap_table(rows)
    print(agreement, gaps, sep="\n\n")
    if args.doc:
        from docpage import write_doc

        argv_shown = sys.argv[1:] if argv is None else argv
        note = f"Rows: `{results}` ({len(rows)} runs; one-vs-rest AUROC; {len(first['tasks'])} tasks)."
        write_doc(args.doc, "selection_runs agreement", "selection_runs.py", argv_shown, agreement, note)
        write_doc(args.doc, "selection_runs gap", "selection_runs.py", argv_shown, gaps,
                  "Mean over tasks of synthetic − real AUROC per candidate, K = all (negative: the set is harder "
                  "than the real anomalies for that candidate).")
    return rows


if __name__ == "__main__":
    main()
