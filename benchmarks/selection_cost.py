"""Model selection over C candidates × T tasks: one feature pass per (image, extractor) through the feature cache,
against recomputing the features for every candidate and task. Feeds the table "Selection cost" of
docs/results/performance.md.

    python benchmarks/selection_cost.py --tasks 10

Real data: sklearn digits, every class as a normal class (T tasks), a Gaussian-noise validation set per task
(exported by the ``model=noise_set`` generator); the candidates are kNN over raw pixels (k = 1, 3, 10), PCA-8 of raw
pixels, 4×4 pixels and a random CNN (k = 3): six candidates over three extractors. Prints one JSON object per way
(images passed through an extractor, seconds) and the ratios; both ways give the same AUROCs (checked).

``--doc PAGE`` (e.g. ``--doc docs/results/performance.md``) also rewrites the page's block
``<!-- begin: selection_cost -->`` ... ``<!-- end: ... -->`` with the command and the table of this run; the rest of
the page is left as it is.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def noise_set(normal: str, out: Path):
    """The Gaussian-noise validation set of one digits task (5 × 5 anomalies, 20 held-out normals), exported as
    ``train.py model=noise_set`` exports it: ``(normal, datamodule, set folder)``."""
    import sys

    if str(ROOT) not in sys.path:  # models/, callbacks/, datamodules/ are folders of the repository
        sys.path.insert(0, str(ROOT))
    from lightning.pytorch import Trainer

    from anomgen.data import Digits
    from callbacks.export import SyntheticSetExport
    from datamodules.anomaly import AnomalyDataModule
    from models.baseline_sets import NoiseSetModel

    datamodule = AnomalyDataModule(Digits, normal_class=normal, validation="none", eval_batch_size=64)
    export = SyntheticSetExport(str(out))
    Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[export]).predict(NoiseSetModel(n_style=5, n_content=5, n_held_out=20), datamodule=datamodule,
                                        return_predictions=False)
    datamodule.setup("test")
    return normal, datamodule, out


def main(argv=None) -> list[dict]:
    from anomgen.data import Digits
    from anomgen.encoders import DownsampledPixels, RandomConvFeatures, RawPixels
    from anomgen.selection.features import FeatureCache
    from anomgen.selection.model_selection import candidates_from_config, select_models
    from anomgen.selection.validation_sets import selection_task

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--doc", default=None, help="a page of docs/results/ whose block this run's table rewrites")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    extractors = {"pixels": RawPixels(), "down4": DownsampledPixels(4, grayscale=True),
                  "random_cnn": RandomConvFeatures(32, 2, seed=0)}
    candidates = candidates_from_config({"pixels_k1": {"extractor": "pixels", "k": 1},
                                         "pixels_k3": {"extractor": "pixels", "k": 3},
                                         "pixels_k10": {"extractor": "pixels", "k": 10},
                                         "pixels_pca8": {"extractor": "pixels", "k": 3, "reducer": "pca:8"},
                                         "down4_k3": {"extractor": "down4", "k": 3},
                                         "random_cnn_k3": {"extractor": "random_cnn", "k": 3}})
    classes = Digits(split="train").available_categories[: args.tasks]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tasks = [selection_task(c, dm.support, dm.test_set, {"noise": folder})
                 for c, dm, folder in (noise_set(c, Path(tmp) / c) for c in classes)]

        def run(name: str, per_candidate_task: bool) -> tuple[dict, dict]:
            caches = []
            t0 = time.perf_counter()
            if per_candidate_task:  # a fresh cache for every (task, candidate): nothing is shared
                aurocs = {}
                for task in tasks:
                    for cand in candidates:
                        caches.append(FeatureCache())
                        res = select_models([task], [cand], extractors, caches[-1], k_values=[None])
                        aurocs[(task.name, cand.name)] = res.tasks[0]["candidates"][cand.name]["real"]["image_AUROC"]
            else:
                caches.append(FeatureCache())
                res = select_models(tasks, candidates, extractors, caches[-1], k_values=[None])
                aurocs = {(t["task"], c): v["real"]["image_AUROC"] for t in res.tasks
                          for c, v in t["candidates"].items()}
            seconds = time.perf_counter() - t0
            computed = sum(v["computed"] for cache in caches for v in cache.stats().values())
            row = {"name": name, "tasks": len(tasks), "candidates": len(candidates), "extractors": len(extractors),
                   "images_through_extractors": computed, "seconds": round(seconds, 3), "device": "cpu"}
            print(json.dumps(row), flush=True)
            rows.append(row)
            return row, aurocs

        shared, a = run("selection_feature_cache", per_candidate_task=False)
        naive, b = run("selection_per_candidate_task", per_candidate_task=True)
    max_diff = max(abs(a[k] - b[k]) for k in a)
    summary = {"name": "selection_cost_ratio",
               "images_naive_over_cached": naive["images_through_extractors"] / shared["images_through_extractors"],
               "seconds_naive_over_cached": naive["seconds"] / shared["seconds"], "max_abs_auroc_diff": max_diff,
               "device": "cpu"}
    print(json.dumps(summary), flush=True)
    rows.append(summary)
    if args.doc:
        import sys

        from docpage import table, write_doc

        body = table(["what", "ours", "baseline", "ratio"], [
            [f"selection, {len(candidates)} candidates over {len(extractors)} extractors × {len(tasks)} digit tasks: "
             "images through an extractor", f"{shared['images_through_extractors']:,} (feature cache)",
             f"{naive['images_through_extractors']:,} (features per candidate and task)",
             f"{summary['images_naive_over_cached']:.1f}× fewer"],
            ["same: wall time (cheap extractors)", f"{shared['seconds']:.2f} s", f"{naive['seconds']:.2f} s",
             f"{summary['seconds_naive_over_cached']:.2f}× faster"]])
        note = f"CPU; both ways give the same AUROCs (largest difference {max_diff:.1e})."
        write_doc(args.doc, "selection_cost", "selection_cost.py", sys.argv[1:] if argv is None else argv, body, note)
    return rows


if __name__ == "__main__":
    main()
