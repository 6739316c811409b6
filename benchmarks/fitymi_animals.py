"""FITYMI on Animal-MNIST over every class as the normal class: kNN on raw pixels, the backbone pretrained on digits
without OE, with OE on a simple source (noise patches) and with OE on score-SDE fakes (stopped by FID). Feeds the
README table "FITYMI on Animal-MNIST, all classes".

    python benchmarks/fitymi_animals.py --classes Bear Bird ... --out fitymi_animals.json

For each class it runs ``train.py experiment=animals_nearnd`` (SDE + FID stop + export + OE + kNN summary) and the
same with ``model=noise_patch`` (OE on noise-patched support images), reads both runs' ``metrics.json``, prints one
JSON object per class and a summary with the mean of each figure over the classes (also written to ``--out``).
Each class takes a few minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ANIMALS = ("Bear", "Bird", "Cat", "Cow", "Dog", "Elephant", "Giraffe", "Horse", "Sheep", "Zebra")
KEYS = ("image_AUROC", "image_AUROC_one_vs_one_mean", "image_AUROC_one_vs_one_closest")


def run_train(log_dir: Path, *overrides: str) -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), f"paths.log_dir={log_dir}", "logger=csv",
                          "experiment=animals_nearnd", *overrides], capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"train.py {' '.join(overrides)} failed:\n{out.stderr[-3000:]}")
    run_dir = Path(out.stdout.strip().splitlines()[-1])
    return json.loads((run_dir / "metrics.json").read_text())


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classes", nargs="+", default=list(ANIMALS))
    parser.add_argument("--out", default=None, help="also write the per-class rows and the summary here (JSON)")
    parser.add_argument("--extra", nargs="*", default=[], help="more overrides for every run (e.g. debug=tiny)")
    parser.add_argument("--sde-extra", nargs="*", default=[],
                        help="more overrides for the SDE runs only (e.g. callbacks.fid_early_stopping.num_samples=128)")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for normal in args.classes:
            common = (f"datamodule.normal_class={normal}", *args.extra)
            sde = run_train(Path(tmp) / "logs", *common, *args.sde_extra)
            noise = run_train(Path(tmp) / "logs", *common, "model=noise_patch", "~model.unet", "callbacks=default")
            row = {"name": "fitymi_animals_class", "normal_class": normal, "fid_at_stop": sde.get("train/fid"),
                   "num_exported": sde.get("predict/num_exported")}
            for key in KEYS:
                row[f"raw_pixels/{key}"] = sde[f"summary/knn_pixels/{key}"]
                row[f"no_oe/{key}"] = sde[f"summary/backbone_without_oe/{key}"]
                row[f"oe_noise_patch/{key}"] = noise[f"summary/backbone_with_oe/{key}"]
                row[f"oe_sde/{key}"] = sde[f"summary/backbone_with_oe/{key}"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    numeric = [k for k in rows[0] if k not in ("name", "normal_class") and rows[0][k] is not None]
    summary = {"name": "fitymi_animals_mean", "classes": [r["normal_class"] for r in rows], "device": "cpu",
               **{k: sum(r[k] for r in rows) / len(rows) for k in numeric}}
    print(json.dumps(summary), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "summary": summary}, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    main()
