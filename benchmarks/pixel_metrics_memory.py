"""Peak memory and time of pixel AUROC and pixel AUPRO, exact vs binned (feeds the table "Pixel metrics memory" of
docs/results/performance.md).

Data: ``--images`` (default 100) synthetic images of ``--size``x``--size`` (default 1024x1024) from
:func:`anomgen.metrics._synthetic.smooth_maps_and_blob_masks` (smooth random maps in (0, 1), random blob masks,
every 4th image normal), generated batch by batch and fed to the metric ``--batch`` (default 10) images per
``update``, as a validation loop does. Each (metric, mode) runs in a fresh subprocess so its peak RSS is its own.

Memory is reported two ways, both honest about what they measure:

* ``state_bytes``: the bytes held by the metric's states after the last update (what grows with the data and what
  DDP gathers);
* ``peak_rss_bytes`` / ``peak_rss_above_baseline_bytes``: the subprocess's peak resident set size
  (``resource.getrusage``), and that peak minus the RSS measured after imports and the generation of one warm-up
  batch (so it holds the data batch, the update temporaries, the states and the ``compute()`` working memory).
  ``tracemalloc`` is not used: it does not see torch's allocations.

Output: one JSON object per line on stdout -- one per (metric, mode), then one per metric comparing them
(``*_ratio`` = binned / exact, ``abs_diff`` = |exact - binned|). Everything runs on the CPU (``"device": "cpu"``).

    python benchmarks/pixel_metrics_memory.py                      # 100 x 1024x1024, ~ a few minutes
    python benchmarks/pixel_metrics_memory.py --images 10 --size 256   # quick check
    python benchmarks/pixel_metrics_memory.py --doc docs/results/performance.md   # also rewrite the page's table

``--doc PAGE`` rewrites the page's block ``<!-- begin: pixel_metrics_memory -->`` ... ``<!-- end: ... -->`` with the
command and the table of this run (peak memory above the baseline, metric time = update + compute); the rest of the
page is left as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

METRICS = ("pixel_AUROC", "pixel_AUPRO")
MODES = ("exact", "binned")


def _current_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _state_bytes(metric) -> int:
    total = 0
    for name in metric._defaults:
        value = getattr(metric, name)
        for t in value if isinstance(value, list) else [value]:
            total += t.numel() * t.element_size()
    return total


def child(metric_name: str, mode: str, args: argparse.Namespace) -> dict:
    import torch

    from anomgen.metrics import AUPRO, AUROC
    from anomgen.metrics import functional as F
    from anomgen.metrics._synthetic import smooth_maps_and_blob_masks

    kw = {} if mode == "exact" else dict(num_thresholds=args.num_thresholds, score_range=(0.0, 1.0))
    metric = AUROC(**kw) if metric_name == "pixel_AUROC" else AUPRO(**kw)
    warm_maps, warm_masks = smooth_maps_and_blob_masks(args.batch, args.size, seed=args.seed + 1)
    del warm_maps, warm_masks
    baseline = _current_rss_bytes()

    generate_s = update_s = 0.0
    for start in range(0, args.images, args.batch):
        n = min(args.batch, args.images - start)
        t0 = time.perf_counter()
        maps, masks = smooth_maps_and_blob_masks(n, args.size, seed=args.seed, start=start)
        t1 = time.perf_counter()
        metric.update(maps, masks)
        update_s += time.perf_counter() - t1
        generate_s += t1 - t0
        del maps, masks
    state_bytes = _state_bytes(metric)
    t0 = time.perf_counter()
    value32 = float(metric.compute())
    compute_s = time.perf_counter() - t0
    # compute() returns float32 (for logging); the agreement is measured on the float64 value of the same curve
    if metric_name == "pixel_AUROC":
        _, tps, fps = metric.curve()
        value = F.auroc_from_curve(tps, fps)
    else:
        fpr, pro, _ = metric.curve()
        value = F.pro_area(fpr, pro, metric.fpr_limit)
    assert abs(value - value32) < 1e-6, (value, value32)
    peak = _peak_rss_bytes()
    return {
        "name": metric_name,
        "mode": mode,
        "params": {
            "images": args.images,
            "height": args.size,
            "width": args.size,
            "pixels": args.images * args.size * args.size,
            "batch": args.batch,
            "num_thresholds": kw.get("num_thresholds"),
            "score_range": list(kw["score_range"]) if kw else None,
            "seed": args.seed,
            "torch_threads": torch.get_num_threads(),
        },
        "value": value,
        "value_float32": value32,
        "state_bytes": state_bytes,
        "peak_rss_bytes": peak,
        "baseline_rss_bytes": baseline,
        "peak_rss_above_baseline_bytes": peak - baseline,
        "update_s": round(update_s, 3),
        "compute_s": round(compute_s, 3),
        "metric_s": round(update_s + compute_s, 3),
        "data_generation_s": round(generate_s, 3),
        "device": "cpu",
    }


def main(argv: list[str] | None = None) -> None:
    from anomgen.metrics.functional import DEFAULT_NUM_THRESHOLDS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--num-thresholds", type=int, default=DEFAULT_NUM_THRESHOLDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), choices=METRICS)
    parser.add_argument("--doc", default=None, help="a page of docs/results/ whose block this run's table rewrites")
    parser.add_argument("--child", nargs=2, metavar=("METRIC", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args)), flush=True)
        return

    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [repo_root, os.environ.get("PYTHONPATH")])))
    base_cmd = [sys.executable, os.path.abspath(__file__), "--images", str(args.images), "--size", str(args.size),
                "--batch", str(args.batch), "--num-thresholds", str(args.num_thresholds), "--seed", str(args.seed)]
    rows = []
    for metric_name in args.metrics:
        results = {}
        for mode in MODES:
            proc = subprocess.run(base_cmd + ["--child", metric_name, mode], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(json.dumps({"name": metric_name, "mode": mode, "error": proc.stderr.strip()[-2000:],
                                  "returncode": proc.returncode, "device": "cpu"}), flush=True)
                continue
            results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(json.dumps(results[mode]), flush=True)
        if len(results) == 2:
            exact, binned = results["exact"], results["binned"]
            print(json.dumps({
                "name": metric_name,
                "comparison": "binned/exact",
                "params": binned["params"],
                "exact_value": exact["value"],
                "binned_value": binned["value"],
                "abs_diff": abs(exact["value"] - binned["value"]),
                "state_bytes_ratio": binned["state_bytes"] / exact["state_bytes"],
                "peak_rss_ratio": binned["peak_rss_bytes"] / exact["peak_rss_bytes"],
                "peak_rss_above_baseline_ratio": (
                    binned["peak_rss_above_baseline_bytes"] / exact["peak_rss_above_baseline_bytes"]
                ),
                "metric_time_ratio": binned["metric_s"] / exact["metric_s"],
                "device": "cpu",
            }), flush=True)
            rows.append((metric_name, exact, binned))
    if args.doc:
        write_table(args, rows, argv)


def write_table(args: argparse.Namespace, rows: list[tuple[str, dict, dict]], argv: list[str] | None) -> None:
    """The page's table: one line per (metric, mode), the binned line with its ratio and gap to the exact value."""
    from docpage import size, table, write_doc

    def sci(x: float) -> str:
        return f"{x:.1e}".replace("e-0", "e-").replace("e+0", "e+")

    lines = []
    for metric_name, exact, binned in rows:
        label = metric_name.replace("_", " ")
        ratio = binned["peak_rss_above_baseline_bytes"] / exact["peak_rss_above_baseline_bytes"]
        for r in (exact, binned):
            extra = [f"{ratio:.2f}", sci(abs(exact["value"] - binned["value"]))] if r is binned else [None, None]
            lines.append([label, r["mode"], size(r["state_bytes"]), size(r["peak_rss_above_baseline_bytes"]),
                          f"{r['metric_s']:.1f} s", *extra])
    body = table(["metric", "mode", "metric states", "peak memory", "time", "binned / exact memory",
                  "|exact − binned|"], lines)
    note = (f"{args.images} anomaly maps of {args.size}×{args.size} ({args.batch} per update), CPU, binned mode with "
            f"K = {args.num_thresholds:,} thresholds over (0, 1); peak memory above the baseline, each case in a "
            "fresh process.")
    write_doc(args.doc, "pixel_metrics_memory", "pixel_metrics_memory.py", sys.argv[1:] if argv is None else argv,
              body, note)


if __name__ == "__main__":
    main()
