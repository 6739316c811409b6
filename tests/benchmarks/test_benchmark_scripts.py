"""The benchmark scripts still run (at toy sizes) and print one JSON object per result."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent.parent / "benchmarks"


def _run(script: str, *args: str) -> list[dict]:
    out = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def test_eap_quality_protocol_runs():
    rows = _run("eap_quality.py", "--seeds", "1", "--subsets", "2", "--datasets", "iris")
    summary = rows[-1]["summary"]
    assert set(summary) == {"EAP", "Random", "Rarity", "P_x", "P_y|x", "P_y|x+N*P_x", "LOO", "KNN-Shapley",
                            "Data-OOB"}
    assert all(0.0 <= r["auc_qlt"] <= 1.0 for r in rows[:-1])
    assert sorted(v["avg_rank"] for v in summary.values()) == list(range(1, 10))  # one data set: ranks 1..9


def test_eap_speed_runs():
    rows = _run("eap_speed.py", "--n-train", "300", "--n-aux", "200", "--anomalies", "10", "--dim", "8",
                "--naive-points", "20")
    assert {r["name"] for r in rows} >= {"rarity_density_vectorised", "rarity_density_naive", "eap_total"}
    assert all(r["device"] == "cpu" for r in rows)


def test_pixel_metrics_memory_runs():
    rows = _run("pixel_metrics_memory.py", "--images", "2", "--size", "32", "--batch", "1", "--metrics", "pixel_AUPRO")
    comparison = [r for r in rows if r.get("comparison") == "binned/exact"]
    assert len(comparison) == 1 and comparison[0]["abs_diff"] < 1e-3


def test_sde_costs_runs():
    rows = _run("sde_costs.py", "--steps", "4", "--every", "2", "--num-samples", "16", "--sampling-steps", "5")
    curve = [r for r in rows if r["name"] == "sde_fid_curve"]
    assert [r["step"] for r in curve] == [2, 4]
    summary = rows[-1]
    assert summary["name"] == "sde_costs" and 0.0 < summary["fid_share_of_wall"] < 1.0


def test_diffstyle_cost_runs_and_ours_is_the_minimum():
    rows = _run("diffstyle_cost.py", "--styles", "2", "--contents", "3", "--steps", "4", "--size", "16",
                "--channels", "8", "16", "--batch-size", "4")
    summary = rows[-1]
    assert summary["ours_equals_minimum"] and summary["max_abs_image_diff"] < 1e-2  # batched float sums differ
    # naive: 2 inversions per pair instead of one per image
    assert summary["evaluations_naive_over_ours"] > 1.0


def test_selection_cost_runs_and_the_cache_computes_each_image_once():
    rows = _run("selection_cost.py", "--tasks", "2")
    shared, naive, summary = rows
    assert summary["max_abs_auroc_diff"] < 1e-9
    assert naive["images_through_extractors"] > shared["images_through_extractors"]


def test_fitymi_classes_resumes_and_summarizes(tmp_path, monkeypatch):
    """fitymi_classes.py (each class is three or more full train.py runs, minutes even tiny): rows are appended per
    class, classes already in the results file are skipped, and the summary averages each figure over the classes
    that have it (a band that a class skipped counts only where present)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import fitymi_classes

    made = []

    def fake_run_class(experiment, normal, work, bands, extra, sde_extra, stop_only):
        made.append(normal)
        row = {"name": "fitymi_class", "experiment": experiment, "normal_class": normal, "fid_at_stop": 50.0}
        if normal == "Dog":
            row["fid_reference"] = 25.0
        else:  # a row from before the reference FID was logged: it comes from the run's target and saved config
            run = tmp_path / "runs" / normal
            (run / ".hydra").mkdir(parents=True)
            (run / ".hydra" / "config.yaml").write_text("callbacks:\n  fid_early_stopping:\n    target_factor: 5.0\n")
            row.update({"fid_target": 110.0, "sde_run": str(run)})
        for prefix, value in (("raw_pixels", 0.9), ("no_oe", 0.6), ("oe_noise_patch", 0.7), ("oe_sde_stop", 0.8)):
            for key in fitymi_classes.KEYS:
                row[f"{prefix}/{key}"] = value + (0.1 if normal == "Cat" else 0.0)
        if normal == "Dog":  # only Dog's FID checks fell in these bands
            row.update({"fid/fid_200-inf": 299.0, "fid/fid_100-200": 170.0})
            row.update({f"oe_sde_fid_200-inf/{key}": 0.65 for key in fitymi_classes.KEYS})
            row.update({f"oe_sde_fid_100-200/{key}": 0.7 for key in fitymi_classes.KEYS})
        return row

    monkeypatch.setattr(fitymi_classes, "run_class", fake_run_class)
    results = tmp_path / "rows.jsonl"
    fitymi_classes.main(["--classes", "Dog", "--results", str(results)])
    summary = fitymi_classes.main(["--classes", "Dog", "Cat", "--results", str(results)])
    assert made == ["Dog", "Cat"]  # Dog was not run again
    assert [json.loads(line)["normal_class"] for line in results.read_text().splitlines()] == ["Dog", "Cat"]
    assert abs(summary["oe_sde_stop/image_AUROC"] - 0.85) < 1e-12 and summary["n/oe_sde_stop/image_AUROC"] == 2
    assert summary["oe_sde_fid_200-inf/image_AUROC"] == 0.65 and summary["n/oe_sde_fid_200-inf/image_AUROC"] == 1
    table = json.loads(results.with_suffix(".summary.json").read_text())["table"].splitlines()
    # band columns farthest from the data first (by mean FID, not by name), then the stop
    # with each set's FID as a multiple of the class's held-out FID (Dog 25, Cat 110 / 5 = 22), mean over classes
    assert table[0] == ("| normal class | FID at stop (× held-out) | raw pixels | ViT, no OE | OE noise patches | "
                        "OE SDE, FID 200-inf (≈12.0×) | OE SDE, FID 100-200 (≈6.8×) | OE SDE, FID stop (≈2.1×) |")
    assert table[2].startswith("| Dog | 50.0 (2.0×) | 0.900 / 0.900")
    assert table[3].startswith("| Cat | 50.0 (2.3×) | 1.000 / 1.000") and "| – | – |" in table[3]  # no band sets
    assert abs(summary["fid_ratio/stop"] - (2.0 + 50 / 22) / 2) < 1e-12 and summary["n/fid_ratio/fid_100-200"] == 1
    assert summary["devices"] == ["unknown"]  # the replaced runs say nothing of their device
    # running one more class (here: none left) summarises the whole results file, not only the classes named
    assert fitymi_classes.main(["--classes", "Cat", "--results", str(results)])["classes"] == ["Dog", "Cat"]
    assert made == ["Dog", "Cat"]
    assert fitymi_classes.parse_band("100:200") == [100.0, 200.0] and fitymi_classes.parse_band(":20") == [None, 20.0]
    with pytest.raises(SystemExit, match="digits_nearnd"):
        fitymi_classes.main(["--experiment", "digits_nearnd", "--classes", "3", "--results", str(results)])


@pytest.mark.parametrize("stop_only", [False, True])
def test_fitymi_class_runs(tmp_path, monkeypatch, stop_only):
    """One class: the SDE run (with the band overrides) and the noise-patch run; --stop-only: the SDE run alone, with
    no bands, and a row without noise figures."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import fitymi_classes

    calls = []

    def fake_run_train(log_dir, *overrides):
        calls.append(overrides)
        metrics = {f"summary/{d}/{k}": 0.5 for d in ("knn_pixels", "backbone_without_oe", "backbone_with_oe")
                   for k in fitymi_classes.KEYS}
        return {**metrics, "train/fid": 40.0}, tmp_path  # no fid_bands folder: no band set was exported

    monkeypatch.setattr(fitymi_classes, "run_train", fake_run_train)
    row = fitymi_classes.run_class("animals_nearnd", "Cat", tmp_path, [[100.0, 200.0]], [], ["model.num_steps=5"],
                                   stop_only=stop_only)
    assert "model.num_steps=5" in calls[0] and "datamodule.normal_class=Cat" in calls[0]
    bands = "[]" if stop_only else "[[100.0, 200.0]]"
    assert f"callbacks.fid_early_stopping.bands={bands}" in calls[0]
    assert len(calls) == (1 if stop_only else 2)
    assert ("oe_noise_patch/image_AUROC" in row) is not stop_only
    assert row["oe_sde_stop/image_AUROC"] == 0.5 and row["fid_at_stop"] == 40.0
    header = fitymi_classes.markdown_table([row], fitymi_classes.summarize([row])).splitlines()[0]
    assert ("OE noise patches" in header) is not stop_only and header.endswith("| OE SDE, FID stop |")
