"""The model-selection report: a markdown summary, the result as JSON and real-vs-synthetic scatter plots.

Every file is written atomically (a temporary file in the same folder, then a rename).
"""

from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path

from anomgen.files import write_atomic
from anomgen.selection.model_selection import ALL, SelectionResult

BENCHMARK_NAMES = {
    "image_AUROC": "one-vs-rest",
    "image_AUROC_one_vs_one_mean": "one-vs-one mean",
    "image_AUROC_one_vs_one_closest": "one-vs-one closest",
}


def _benchmark(key: str) -> str:
    return BENCHMARK_NAMES.get(key, key)


def _num(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return f"{value:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    def clean(cell: str) -> str:
        return str(cell).replace("|", "\\|")

    return ["| " + " | ".join(map(clean, header)) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(map(clean, row)) + " |" for row in rows)]


def _default_k(result: SelectionResult, k: str | None) -> str:
    """``k``, or ``"all"`` (every synthetic anomaly) when the result has it, else its last K."""
    ks = result.summary["k"]
    return k if k is not None else (ALL if ALL in ks else ks[-1])


def render_selection_markdown(result: SelectionResult, benchmark: str = "image_AUROC", k: str | None = None) -> str:
    """Markdown: mean real vs synthetic AUROC per candidate; the agreement per validation set, K and benchmark;
    the per-task selection on ``benchmark``. Mean synthetic AUROC and per-task rows use ``k`` (a K label; default
    ``"all"``, every synthetic anomaly)."""
    s = result.summary
    sets, ks, real_keys = s["validation_sets"], s["k"], result.real_keys
    k = _default_k(result, k)
    if benchmark not in real_keys or k not in ks:
        raise ValueError(f"render_selection_markdown: benchmark {benchmark!r} / K {k!r} not in the result "
                         f"(benchmarks {real_keys}, K {ks})")
    lines = ["# Model selection by synthetic validation", "",
             (f"{len(s['tasks'])} task(s), {len(s['candidates'])} candidate(s), validation set(s): {', '.join(sets)}; "
              f"K (lowest-scored synthetic anomalies kept): {', '.join(ks)}."), "",
             "## Mean AUROC over tasks", "",
             f"Real AUROC on the test split; synthetic AUROC with K = {k}.", ""]
    header = ["candidate", "extractor", "k", "distance", "reducer",
              *(f"real {_benchmark(key)}" for key in real_keys), *(f"synthetic {vs}" for vs in sets)]
    rows = [[c.name, c.extractor, str(c.k), c.distance, c.reducer or "-",
             *(_num(s["mean_real"][key][c.name]) for key in real_keys),
             *(_num(s["mean_synthetic"][vs][k][c.name]) for vs in sets)] for c in result.candidates]
    lines += _table(header, rows)
    lines += ["", "## Agreement of synthetic with real AUROC", "",
              ("Per task: means over tasks (Spearman / Kendall over the tasks where both sides vary). Of means: the "
               "same on the per-candidate means over tasks."), ""]
    header = ["validation set", "K", "benchmark", "Spearman", "Kendall", "top-1 rate", "regret", "mean |syn − real|",
              "Spearman of means", "Kendall of means", "selected (means)", "best (means)", "top-1 (means)"]
    rows = []
    for vs in sets:
        for kk in ks:
            for key in real_keys:
                a = s["agreement"][vs][kk][key]
                d = a["dataset"]
                rows.append([vs, kk, _benchmark(key), _num(a["spearman"]), _num(a["kendall"]), _num(a["top1_rate"]),
                             _num(a["regret"]), _num(a["abs_gap"]), _num(d["spearman"]), _num(d["kendall"]),
                             d["selected"], d["best"],
                             _num(d["top1_agreement"])])
    lines += _table(header, rows)
    lines += ["", f"## How far synthetic AUROC is from real ({_benchmark(benchmark)}, K = {k})", "",
              "Per candidate, mean over tasks of synthetic − real AUROC (signed) and of its absolute value.", ""]
    header = ["candidate", *(f"{vs}: synthetic − real / |…|" for vs in sets)]
    rows = [[c.name, *(f"{_num(s['gap'][vs][k][benchmark][c.name])} / {_num(s['abs_gap'][vs][k][benchmark][c.name])}"
                       for vs in sets)] for c in result.candidates]
    lines += _table(header, rows)
    lines += ["", f"## Per-task selection ({_benchmark(benchmark)}, K = {k})", ""]
    header = ["task", "validation set", "selected", "best", "selected real", "best real", "regret", "top-1",
              "Spearman"]
    rows = []
    for task in s["tasks"]:
        for vs in sets:
            a = s["per_task"][task][vs][k][benchmark]
            rows.append([task, vs, a["selected"], a["best"], _num(a["selected_real"]), _num(a["best_real"]),
                         _num(a["regret"]), _num(a["top1_agreement"]), _num(a["spearman"])])
    lines += _table(header, rows)
    return "\n".join(lines) + "\n"


def plot_real_vs_synthetic(result: SelectionResult, path: str | os.PathLike, benchmark: str = "image_AUROC",
                           validation_set: str | None = None, k: str | None = None) -> Path:
    """Scatter of the per-candidate mean synthetic AUROC (x; ``validation_set`` default the first, ``k`` default
    ``"all"``) against the mean real AUROC (y, ``benchmark``) over tasks, one labelled point per candidate, with
    the diagonal; a PNG written atomically to ``path``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    s = result.summary
    k = _default_k(result, k)
    validation_set = validation_set or s["validation_sets"][0]
    if validation_set not in s["validation_sets"] or benchmark not in s["mean_real"] or k not in s["k"]:
        raise ValueError(f"plot_real_vs_synthetic: no {validation_set!r} / {benchmark!r} / K {k!r} in the result "
                         f"(sets {s['validation_sets']}, benchmarks {list(s['mean_real'])}, K {s['k']})")
    names = s["candidates"]
    xs = [s["mean_synthetic"][validation_set][k][n] for n in names]
    ys = [s["mean_real"][benchmark][n] for n in names]
    agreement = s["agreement"][validation_set][k][benchmark]["dataset"]
    fig = Figure(figsize=(5.5, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    low, high = min(xs + ys), max(xs + ys)
    pad = max(0.02, 0.05 * (high - low))
    ax.plot([low - pad, high + pad], [low - pad, high + pad], color="grey", lw=1, ls="--", label="y = x")
    ax.scatter(xs, ys, s=30, zorder=3)
    for n, x, y in zip(names, xs, ys, strict=True):
        ax.annotate(n, (x, y), xytext=(4, 3), textcoords="offset points", fontsize=7)
    ax.set_xlim(low - pad, high + pad)
    ax.set_ylim(low - pad, high + pad)
    ax.set_xlabel(f"synthetic AUROC ({validation_set}, K = {k}), mean over tasks")
    ax.set_ylabel(f"real AUROC ({_benchmark(benchmark)}), mean over tasks")
    ax.set_title(f"Spearman {_num(agreement['spearman'])}, Kendall {_num(agreement['kendall'])}, "
                 f"selected {agreement['selected']}", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return write_atomic(Path(path), buffer.getvalue())


def _file_part(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "set"


def write_selection_report(result: SelectionResult, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``selection.md``, ``selection.json`` and ``scatter_<set>_<benchmark>.png`` (K = all) atomically into
    ``out_dir``; returns ``{file name: path}``."""
    out = Path(out_dir)
    written = {
        "selection.md": write_atomic(out / "selection.md", render_selection_markdown(result).encode()),
        "selection.json": write_atomic(
            out / "selection.json", json.dumps(result.to_dict(), indent=2, allow_nan=False).encode() + b"\n"),
    }
    for vs in result.validation_sets:
        for key in result.real_keys:
            name = f"scatter_{_file_part(vs)}_{_file_part(key)}.png"
            written[name] = plot_real_vs_synthetic(result, out / name, benchmark=key, validation_set=vs)
    return written


__all__ = ["plot_real_vs_synthetic", "render_selection_markdown", "write_selection_report"]
