"""The benchmark scripts still run (at toy sizes) and print one JSON object per result."""

from __future__ import annotations

import json
import re
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



@pytest.mark.slow  # 25-40 s even at 1/16 width: pytest -m slow runs it
def test_concept_speed_runs_at_a_toy_size_and_writes_its_block(tmp_path):
    """concept_speed.py on the CPU at 1/16 of SD 2.1's widths and 64 px: the baseline and ADP's memory-saving setting
    (fp16 frozen parts + autocast, checkpointing, cached latents) with the CLIP term, rows appended to --results, the
    page's block rewritten."""
    page = tmp_path / "performance.md"
    page.write_text(PAGE.replace("selection_cost", "concept_speed"))
    results = tmp_path / "concept.jsonl"
    rows = _run("concept_speed.py", "--device", "cpu", "--scale", "0.0625", "--resolution", "64", "--batch-sizes", "1",
                "--configs", "fp32", "fp16_ckpt_cached", "--warmup", "1", "--steps", "1", "--threads", "1",
                "--results", str(results), "--doc", str(page))
    base, adp_setting, summary = rows
    assert (base["config"], base["speed_ratio"], base["latents"]) == ("fp32", 1.0, "vae_per_step")
    assert adp_setting["config"] == "fp16_ckpt_cached" and adp_setting["latents"] == "cached"
    assert adp_setting["gradient_checkpointing"] and adp_setting["half"] == "fp16" and adp_setting["speed_ratio"] > 0
    assert base["finite_loss"] and adp_setting["finite_loss"] and base["clip_term"] and base["device"] == "cpu"
    assert base["parameters"]["unet"] < 5e6 and summary["name"] == "concept_speed_summary"
    assert len(results.read_text().splitlines()) == 3
    block = page.read_text().split("<!-- begin: concept_speed -->\n", 1)[1].split("<!-- end: concept_speed -->")[0]
    assert block.startswith("```bash\npython benchmarks/concept_speed.py --device cpu")
    assert "| `fp16_ckpt_cached` | 1 |" in block and "SD 2.1 widths × 0.0625" in block and "CPU: not the GPU" in block


def test_concept_speed_estimates_and_fits_its_budget(monkeypatch):
    """The time estimate scales the measured step by batch size and the assumed fp16 / checkpointing factors; over
    the budget, the timed steps are lowered to fit, never below 3."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import concept_speed as cs

    done = [{"config": "fp32", "batch_size": 1, "seconds_per_step": 1.0}]
    todo = [("fp32", 4), ("fp16", 1), ("fp16_ckpt", 4)]
    half, ckpt = cs._HALF_FACTOR, cs._CKPT_FACTOR
    expected = 13 * (4 + half + 4 * half * ckpt)
    assert abs(cs.estimate_seconds(done, todo, 3, 10) - expected) < 1e-9
    assert cs.fit_steps(done, todo, 3, 10, elapsed=0, budget_s=0) == 10  # no budget
    assert cs.fit_steps(done, todo, 3, 10, elapsed=0, budget_s=1e6) == 10
    per_step = 4 + half + 4 * half * ckpt
    assert cs.fit_steps(done, todo, 3, 10, elapsed=10, budget_s=10 + 9 * per_step) == 6  # 3 warm-up + 6 fit
    assert cs.fit_steps(done, todo, 3, 10, elapsed=10, budget_s=11) == 3
    assert cs.fit_steps(done, todo, 3, 2, elapsed=10, budget_s=11) == 2

def test_fitymi_classes_resumes_and_summarizes(tmp_path, monkeypatch):
    """fitymi_classes.py (each class is three or more full train.py runs, minutes even tiny): rows are appended per
    class, classes already in the results file are skipped, and the summary averages each figure over the classes
    that have it (a band that a class skipped counts only where present)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import fitymi_classes

    made = []

    def fake_run_class(experiment, normal, work, bands, extra, sde_extra, stop_only, recipes):
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
    with pytest.raises(SystemExit, match="fitymi_digits"):
        fitymi_classes.main(["--experiment", "fitymi_digits", "--classes", "3", "--results", str(results)])


@pytest.mark.parametrize("stop_only", [False, True])
def test_fitymi_class_runs(tmp_path, monkeypatch, stop_only):
    """One class: the SDE run (with the band overrides) and the noise-patch run; --stop-only: the SDE run alone, with
    no bands, and a row without noise figures."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import fitymi_classes

    calls = []

    def fake_run_train(log_dir, *overrides):
        calls.append(overrides)
        metrics = {f"evaluate/test/{d}/{k}": 0.5 for d in ("knn_pixels", "backbone_without_oe", "backbone_with_oe")
                   for k in fitymi_classes.KEYS}
        return {**metrics, "sde/train/fid": 40.0}, tmp_path  # no sde/fid_bands folder: no band set was exported

    monkeypatch.setattr(fitymi_classes, "run_train", fake_run_train)
    row = fitymi_classes.run_class("fitymi_animals", "Cat", tmp_path, [[100.0, 200.0]], [], ["model.num_steps=5"],
                                   stop_only=stop_only)
    assert "model.num_steps=5" in calls[0] and "datamodule.normal_class=Cat" in calls[0]
    bands = "[]" if stop_only else "[[100.0, 200.0]]"
    assert f"callbacks.fid_early_stopping.bands={bands}" in calls[0]
    assert len(calls) == (1 if stop_only else 2)
    assert ("oe_noise_patch/image_AUROC" in row) is not stop_only
    assert row["oe_sde_stop/image_AUROC"] == 0.5 and row["fid_at_stop"] == 40.0
    header = fitymi_classes.markdown_table([row], fitymi_classes.summarize([row])).splitlines()[0]
    assert ("OE noise patches" in header) is not stop_only and header.endswith("| OE SDE, FID stop |")


def test_fitymi_class_recipes(tmp_path, monkeypatch):
    """--recipe NAME OVERRIDES...: one more OE run per recipe on the stop set (the SDE stage left out), its figures
    under oe_recipe_<name>/ and a table column each; a recipe without overrides or with an override as its name is
    refused."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import fitymi_classes

    calls = []

    def fake_run_train(log_dir, *overrides):
        calls.append(overrides)
        auroc = 0.9 if "model.optimizer.lr=1e-3" in overrides else 0.5
        return {f"evaluate/test/{d}/{k}": auroc for d in ("knn_pixels", "backbone_without_oe", "backbone_with_oe")
                for k in fitymi_classes.KEYS}, tmp_path

    from anomgen.pipeline import write_run_record

    # the SDE run's pipeline record names its stop set (the recipe runs read it from there)
    (tmp_path / "pipeline.json").write_text(json.dumps({"order": ["sde"], "stages": {"sde": str(tmp_path / "sde")}}))
    write_run_record(tmp_path / "sde", {"synthetic_set": str(tmp_path / "sde" / "synthetic_set")}, {})
    monkeypatch.setattr(fitymi_classes, "run_train", fake_run_train)
    row = fitymi_classes.run_class("fitymi_digits", "3", tmp_path, [], [], [], stop_only=True,
                                   recipes={"lr1e-3": ["model.optimizer.lr=1e-3"]})
    assert len(calls) == 2
    assert {f"oe.set={tmp_path / 'sde' / 'synthetic_set'}", "~pipeline.sde", "model.optimizer.lr=1e-3",
            "datamodule.normal_class=3"} <= set(calls[1])
    assert row["oe_recipe_lr1e-3/image_AUROC"] == 0.9 and row["oe_sde_stop/image_AUROC"] == 0.5
    assert row["recipe/lr1e-3"] == ["model.optimizer.lr=1e-3"]
    header = fitymi_classes.markdown_table([row], fitymi_classes.summarize([row])).splitlines()[0]
    assert header.endswith("| OE SDE stop, recipe lr1e-3 |")
    for bad in (["lr1e-3"], ["model.optimizer.lr=1e-3"]):
        with pytest.raises(SystemExit):
            fitymi_classes.main(["--recipe", *bad, "--classes", "Dog"])


PAGE = """# A page

Text above, written by hand.

<!-- begin: selection_cost -->
old command and table
<!-- end: selection_cost -->

Text between the blocks.

<!-- begin: fitymi_classes rows -->
| the old table |
<!-- end: fitymi_classes rows -->

Text below.
"""


def _outside_blocks(page: str) -> str:
    return re.sub(r"<!-- begin: (.*?) -->\n.*?<!-- end: \1 -->", r"<\1>", page, flags=re.S)


def test_replace_block_rewrites_one_block_and_nothing_else(tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from docpage import replace_block, table
    finally:
        sys.path.remove(str(BENCHMARKS))
    page = tmp_path / "page.md"
    page.write_text(PAGE)
    replace_block(page, "selection_cost", "\nnew text\n" + table(["a", "b|c"], [[1, None]]) + "\n")
    text = page.read_text()
    assert "<!-- begin: selection_cost -->\nnew text\n| a | b\\|c |\n|---|---|\n| 1 | |\n<!-- end: selection_cost -->" \
        in text
    assert _outside_blocks(text) == _outside_blocks(PAGE) and "| the old table |" in text
    replace_block(page, "selection_cost", "")  # an empty block keeps its markers
    assert "<!-- begin: selection_cost -->\n<!-- end: selection_cost -->" in page.read_text()
    with pytest.raises(ValueError, match="found 0"):  # never appended where nobody looks
        replace_block(page, "eap_speed", "x")
    page.write_text(PAGE + PAGE)
    with pytest.raises(ValueError, match="found 2"):
        replace_block(page, "selection_cost", "x")


def test_selection_cost_refreshes_its_block_of_a_page(tmp_path):
    """A benchmark run with --doc rewrites its block of a copy of its page: the command it ran and its table; the
    rest of the page stays byte for byte."""
    page = tmp_path / "performance.md"
    page.write_text(PAGE)
    rows = _run("selection_cost.py", "--tasks", "2", "--doc", str(page))
    text = page.read_text()
    assert _outside_blocks(text) == _outside_blocks(PAGE)
    block = text.split("<!-- begin: selection_cost -->\n", 1)[1].split("<!-- end: selection_cost -->", 1)[0]
    assert block.startswith("```bash\npython benchmarks/selection_cost.py --tasks 2\n```\n")
    assert "| what | ours | baseline | ratio |" in block and "old command" not in block
    shared = rows[0]["images_through_extractors"]
    assert f"| {shared:,} (feature cache) |" in block and "× 2 digit tasks" in block


def test_fitymi_classes_refreshes_its_block_from_the_results_file(tmp_path, monkeypatch):
    """fitymi_classes.py --doc: the block named after the results file gets the table of every row in it (here with
    no run: the class is already there), rows of the experiment's old name are read as the new one, and the rest of
    the page is untouched."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import fitymi_classes

    monkeypatch.setattr(fitymi_classes, "run_class", lambda *a, **k: pytest.fail("a class in the results file ran"))
    results = tmp_path / "rows.jsonl"
    row = {"name": "fitymi_class", "experiment": "animals_nearnd", "normal_class": "Dog", "device": "cpu",
           "fid_at_stop": 50.0, "fid_reference": 25.0,
           **{f"{p}/{k}": 0.5 for p in ("raw_pixels", "no_oe", "oe_sde_stop") for k in fitymi_classes.KEYS}}
    results.write_text(json.dumps(row) + "\n")
    page = tmp_path / "fitymi.md"
    page.write_text(PAGE)
    summary = fitymi_classes.main(["--experiment", "fitymi_animals", "--classes", "Dog", "--results", str(results),
                                   "--doc", str(page)])
    assert summary["experiment"] == "fitymi_animals"
    text = page.read_text()
    assert _outside_blocks(text) == _outside_blocks(PAGE) and "| the old table |" not in text
    assert f"--results {results}" in text.replace(" \\\n    ", " ") and "--doc" not in text
    assert "| Dog | 50.0 (2.0×) | 0.500 / 0.500 | 0.500 / 0.500 | 0.500 / 0.500 |" in text


def test_adp_table_grid_resumes_and_makes_both_tables(tmp_path, monkeypatch):
    """adp_table.py: one row per (category, K, seed), combinations already in the results file skipped; Table 1 is
    mean ± std over seeds per category and K with the mean over categories, Table 2 the K = 4 ablation; plumbing rows
    are labelled as such. (Each real run is a whole pipeline: tests/models/test_adp_stages.py runs the tiny one.)"""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import adp_table

    made = []

    def fake_run_one(experiment, category, k, seed, tiny, extra, work):
        made.append((category, k, seed))
        base = {"bottle": 0.9, "cable": 0.7}[category] + 0.01 * seed
        return {"experiment": experiment, "category": category, "k": k, "seed": seed, "plumbing": tiny, "extra": extra,
                "image_AUROC": {d: base + 0.001 * i for i, d in enumerate(("winclip_plus", "adp", "adp_l", "ti",
                                                                             "c_n", "c_a"))}}

    monkeypatch.setattr(adp_table, "run_one", fake_run_one)
    results = tmp_path / "rows.jsonl"
    adp_table.main(["--categories", "bottle", "--shots", "4", "--seeds", "0", "1", "--tiny", "--results",
                    str(results)])
    text = adp_table.main(["--categories", "bottle", "cable", "--shots", "4", "--seeds", "0", "1", "--tiny",
                           "--results", str(results)])
    assert made == [("bottle", 4, 0), ("bottle", 4, 1), ("cable", 4, 0), ("cable", 4, 1)]
    assert text.startswith("**Plumbing, not results:**")
    # bottle: WinCLIP+ 90.0 and 91.0 over the seeds -> 90.5 ± 0.7; the mean over categories (90.5 + 70.5) / 2
    assert "| 4 | bottle | 2 | 90.5 ± 0.7 | 90.6 ± 0.7 | 90.7 ± 0.7 |" in text
    assert "| 4 | **mean** | | 80.5 | 80.6 | 80.7 |" in text
    assert "| 4 | paper | 88.6 | 95.9 | 95.2 | 96.0 |" in text   # the paper's Table 2 (MVTec)
    assert len(results.read_text().splitlines()) == 4


def test_adp_ti_animals_runs_and_refreshes_its_block(tmp_path):
    """adp_ti_animals.py --tiny (Animal-MNIST, toy sizes): every phase runs, the row has the claim's figures (the
    held-out class's share for the learned token and the initial word, per-class accuracy on trained classes, the
    held-out losses), is appended to --results, the grid is written, and --doc rewrites only its block."""
    pytest.importorskip("animal_mnist")
    page = tmp_path / "adp.md"
    page.write_text(PAGE.replace("selection_cost", "adp_ti_animals"))
    results, grid = tmp_path / "rows.jsonl", tmp_path / "grid.png"
    rows = _run("adp_ti_animals.py", "--tiny", "--results", str(results), "--grid", str(grid), "--doc", str(page))
    row = rows[-1]
    assert row["name"] == "adp_ti_animals" and row["settings"]["tiny"] and row["settings"]["held_out"] == "Zebra"
    assert [json.loads(line)["name"] for line in results.read_text().splitlines()] == ["adp_ti_animals"]
    assert set(row["calls"]) == {"token", "word", "random"} and row["calls"]["token"]["n"] == 6
    assert all(0.0 <= row["calls"][k]["held_out_share"] <= 1.0 for k in ("token", "word"))
    assert set(row["generation_accuracy"]["per_class"]) == {"Bear", "Bird", "Cat", "Cow", "Dog", "Elephant",
                                                             "Giraffe", "Horse", "Sheep"}
    assert set(row["heldout_loss"]) == {"Zebra shots", "Zebra", "Horse"}
    assert row["textual_inversion"]["relative_drift"] > 0
    assert set(row["seconds"]) >= {"classifier", "text_to_image", "textual_inversion", "generation", "total"}
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = page.read_text()
    assert _outside_blocks(text) == _outside_blocks(PAGE.replace("selection_cost", "adp_ti_animals"))
    block = text.split("<!-- begin: adp_ti_animals -->\n", 1)[1].split("<!-- end: adp_ti_animals -->", 1)[0]
    assert block.startswith("```bash\npython benchmarks/adp_ti_animals.py --tiny") and "--doc" not in block
    assert "| `a photo of a <zebra-ti>` (learned) | 6 |" in block and "called Zebra" in block and "](grid.png)" in block


def test_anomalydiffusion_tables_resume_and_make_the_four_tables(tmp_path, monkeypatch):
    """anomalydiffusion_tables.py: one row per category, categories already in the results file skipped; each table
    has a row per category, the mean over categories and the paper's means; plumbing rows are labelled as such."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import anomalydiffusion_tables as tables

    made = []
    keys = [key for _, columns, _ in tables.TABLES for key, _ in columns]

    def fake_run_one(experiment, category, tiny, extra, work):
        made.append(category)
        base = {"bottle": 0.9, "cable": 0.7}[category]
        return {"experiment": experiment, "category": category, "plumbing": tiny, "extra": extra,
                "metrics": {key: base + 0.01 * i for i, key in enumerate(keys)}}

    monkeypatch.setattr(tables, "run_one", fake_run_one)
    results = tmp_path / "rows.jsonl"
    tables.main(["--categories", "bottle", "--tiny", "--results", str(results)])
    text = tables.main(["--categories", "bottle", "cable", "--tiny", "--results", str(results)])
    assert made == ["bottle", "cable"] and len(results.read_text().splitlines()) == 2
    assert text.startswith("**Plumbing, not results:**")
    assert "| bottle | 0.90 | 0.91 |" in text and "| **mean** | 0.80 | 0.81 |" in text  # Table 1: IS, IC-LPIPS
    assert "| bottle | 92.0 | 93.0 | 94.0 | 95.0 |" in text  # Table 2 in percent
    assert "| **mean** | 82.0 | 83.0 | 84.0 | 85.0 |" in text  # (0.92 + 0.72) / 2
    assert "| paper (mean) | 99.1 | 81.4 | 76.3 | 94.0 |" in text
    assert "| paper (mean) | 66.1 |" in text  # Table 4


    assert "| paper (mean) | 99.1 | 81.4 | 76.3 | 94.0 |" in text
    assert "| paper (mean) | 66.1 |" in text  # Table 4


def _ddp_scaling():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import ddp_scaling
        import docpage  # noqa: F401  (ddp_scaling.markdown imports it)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return ddp_scaling


def test_ddp_scaling_ratios_and_table(tmp_path):
    """The figures of ddp_scaling.py: samples/s per kind and process count as ratios to 1 process, the table, and
    its block of the performance page (a copy)."""
    ddp_scaling = _ddp_scaling()
    measured = {1: {"training": {"samples": 100, "seconds": 2.0}, "generation": {"samples": 64, "seconds": 4.0},
                    "fid_check": {"samples": 64, "seconds": 8.0}, "device": "cpu (2 cores)"},
                2: {"training": {"samples": 200, "seconds": 2.5}, "generation": {"samples": 64, "seconds": 2.0},
                    "fid_check": {"samples": 64, "seconds": 5.0}, "device": "cpu (2 cores)"}}
    rows = ddp_scaling.results(measured)
    assert [(r["name"], r["processes"]) for r in rows] == [("ddp_scaling_training", 1), ("ddp_scaling_training", 2),
                                                           ("ddp_scaling_generation", 1),
                                                           ("ddp_scaling_generation", 2),
                                                           ("ddp_scaling_fid_check", 1), ("ddp_scaling_fid_check", 2)]
    assert [r["samples_per_s"] for r in rows] == [50.0, 80.0, 16.0, 32.0, 8.0, 12.8]
    assert [r["ratio"] for r in rows] == [1.0, 1.6, 1.0, 2.0, 1.0, 1.6]
    text = ddp_scaling.markdown(rows)
    assert text.splitlines() == [
        "| processes | training samples/s | ratio to 1 | generation + export samples/s | ratio to 1 "
        "| FID check samples/s | ratio to 1 |",
        "|---|---|---|---|---|---|---|",
        "| 1 | 50.0 | 1.00× | 16.0 | 1.00× | 8.0 | 1.00× |",
        "| 2 | 80.0 | 1.60× | 32.0 | 2.00× | 12.8 | 1.60× |",
    ]
    page = tmp_path / "performance.md"
    page.write_text((BENCHMARKS.parent / "docs" / "results" / "performance.md").read_text())
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from docpage import write_doc
    finally:
        sys.path.remove(str(BENCHMARKS))
    write_doc(page, "ddp_scaling", "ddp_scaling.py", ["--tiny"], text)
    assert "python benchmarks/ddp_scaling.py --tiny\n```\n\n| processes |" in page.read_text()


@pytest.mark.slow  # three processes start (about 25 s); its table is checked in the default run above
def test_ddp_scaling_tiny_runs_on_one_and_two_processes():
    """Two worker runs (1 + 2 gloo processes), each importing the stack: about 30 s here (60 s beside other jobs)."""
    rows = _run("ddp_scaling.py", "--tiny", "--processes", "1", "2")
    assert [(r["name"], r["processes"]) for r in rows] == [("ddp_scaling_training", 1), ("ddp_scaling_training", 2),
                                                           ("ddp_scaling_generation", 1),
                                                           ("ddp_scaling_generation", 2),
                                                           ("ddp_scaling_fid_check", 1), ("ddp_scaling_fid_check", 2)]
    assert all(r["samples_per_s"] > 0 for r in rows) and rows[0]["ratio"] == rows[2]["ratio"] == rows[4]["ratio"] == 1.0
    assert [r["samples"] for r in rows] == [24, 48, 8, 8, 8, 8]  # 3 timed steps × 8 images × N; the whole set, once


@pytest.mark.slow  # every part at toy sizes (about 20 s); pytest -m slow runs it
def test_gpu_timings_tiny_runs_every_part_and_writes_its_block(tmp_path):
    """gpu_timings.py --tiny (about 25 s here): every part runs at toy sizes on the CPU, its rows say plumbing and
    carry the versions and the device, the concept rows come from concept_speed.py's own function, and --doc rewrites
    the gpu_timings block of a copy of the performance page and nothing else of it."""
    source = (BENCHMARKS.parent / "docs" / "results" / "performance.md").read_text()
    page = tmp_path / "performance.md"
    page.write_text(source)
    results = tmp_path / "rows.jsonl"
    rows = _run("gpu_timings.py", "--tiny", "--results", str(results), "--doc", str(page))
    *measured, summary = rows
    assert [r["measurement"] for r in measured] == ["diffstyle_set", "sde_training_step", "pixel_metrics_binned",
                                                     "pixel_metrics_exact", "concept_step_fp32",
                                                     "concept_step_fp16_ckpt_cached"]
    assert all(r["name"] == "gpu_timings" and r["plumbing"] and r["device"] == "cpu" and "error" not in r
               and r["torch"] and "cuda" in r and "tf32_matmul" in r for r in measured)
    diffstyle, sde, binned, exact, fp32, adp_setting = measured
    assert diffstyle["images"] == 4 and diffstyle["ddim_steps"] == 10 and diffstyle["edited_steps"] == 6
    # S + C inversions (n − 1 passes each, one more per content image) + S·C generations (n + N_edit passes each)
    assert diffstyle["unet_passes"] == 4 * 9 + 2 + 4 * (10 + 6) and diffstyle["images_per_s"] > 0
    assert sde["steps"] == 3 and sde["batch_size"] == 4 and sde["steps_per_s"] > 0 and sde["gradient_clip_val"] == 1.0
    assert binned["num_thresholds"] == 10_000 and exact["num_thresholds"] is None
    assert binned["max_abs_diff_exact_binned"] < 1e-3 and set(binned["values"]) == set(exact["values"])
    assert fp32["config"] == "fp32" and fp32["speed_ratio"] == 1.0 and adp_setting["latents"] == "cached"
    assert summary["name"] == "gpu_timings_summary" and set(summary["part_seconds"]) == {"diffstyle", "sde", "pixel",
                                                                                         "concept"}
    assert len(results.read_text().splitlines()) == len(rows)
    text = page.read_text()
    assert _outside_blocks(text) == _outside_blocks(source) and "Not yet run: no GPU" not in text
    block = text.split("<!-- begin: gpu_timings -->\n", 1)[1].split("<!-- end: gpu_timings -->", 1)[0]
    assert block.startswith("```bash\npython benchmarks/gpu_timings.py --tiny --results ") and "--doc" not in block
    assert "**Plumbing, not results:**" in block and "| DiffStyle set |" in block
    assert "| pixel metrics, exact |" in block and "| ADP concept step, `fp16_ckpt_cached` |" in block


def test_gpu_timings_refuses_cuda_without_a_gpu_and_picks_parts(monkeypatch):
    """Without CUDA the default device is refused with a pointer to --tiny; --parts keeps the script's order."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import gpu_timings

    monkeypatch.setattr(gpu_timings.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--tiny"):
        gpu_timings.main(["--parts", "pixel"])
    args = gpu_timings.parse_args(["--parts", "concept", "diffstyle"])
    assert args.parts == ["diffstyle", "concept"] and (args.styles, args.pixel_size, args.sde_steps) == (4, 1024, 60)
    tiny = gpu_timings.parse_args(["--tiny"])
    assert gpu_timings.resolve_device(tiny).type == "cpu" and (tiny.styles, tiny.pixel_size) == (2, 64)
    assert "--scale" in gpu_timings.concept_argv(tiny, gpu_timings.torch.device("cpu"), 1.0)


def test_fitymi_recipe_is_chosen_on_every_digit_and_applied_to_animals(tmp_path, monkeypatch):
    """fitymi_recipe.py: the recipe with the best mean one-vs-rest AUROC over the ten digits (the pipeline's own OE is
    "default"), refused until every digit has a row; the Animal-MNIST run gets the chosen recipe's overrides only."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import fitymi_recipe

    def digit_row(digit: str, best: str) -> dict:
        row = {"normal_class": digit}
        for recipe in fitymi_recipe.RECIPES:
            value = 0.8 if recipe == best else 0.6
            row.update({f"{fitymi_recipe.prefix(recipe)}/{key}": value for key in
                        ("image_AUROC", "image_AUROC_one_vs_one_closest")})
        return row

    # lr1e-3 best on 6 digits, the default on 4: lr1e-3 has the higher mean
    rows = [digit_row(str(d), "lr1e-3" if d < 6 else "default") for d in range(10)]
    assert fitymi_recipe.choose(rows) == "lr1e-3"
    assert fitymi_recipe.choose([digit_row(str(d), "default") for d in range(10)]) == "default"
    with pytest.raises(SystemExit, match=r"\['9'\]"):
        fitymi_recipe.choose(rows[:9])
    table = fitymi_recipe.choice_table(rows)
    assert "| lr 1e-3, 30 epochs, blocks 0-1 frozen **chosen** | 0.720 / 0.720 | 6 |" in table
    calls = []
    monkeypatch.setattr(fitymi_recipe.fitymi_classes, "main", lambda argv: calls.append(argv))
    digits = tmp_path / "digits.jsonl"
    digits.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert fitymi_recipe.main(["--digits-results", str(digits), "--animals-results", str(tmp_path / "a.jsonl")]) \
        == "lr1e-3"
    assert calls[0].count("--recipe") == len(fitymi_recipe.RECIPES) - 1  # every recipe but the pipeline's own
    animals = calls[1]
    assert animals[animals.index("--experiment") + 1] == "fitymi_animals" and "--stop-only" in animals
    assert animals[animals.index("--recipe"):] == ["--recipe", "lr1e-3", "oe.lr=1e-3"]
    # the pipeline's own OE run of every call is the earlier recipe, whatever configs/fitymi/small.yaml says now
    for argv in calls:
        at = argv.index("--extra")
        assert argv[at + 1 : at + 1 + len(fitymi_recipe.BASELINE)] == ["oe.lr=4e-3", "oe.freeze_blocks=2",
                                                                      "oe.epochs=30"]


def test_selection_runs_tables_from_run_folders(tmp_path, monkeypatch):
    """selection_runs.py: each --run folder's selection.json is summarised again (the gap per candidate included),
    kept as one row per label (a label given again replaces its row), and tabled: agreement per set and K, and
    synthetic − real per candidate."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import selection_runs

    from anomgen.selection.model_selection import REAL_KEYS

    def run_folder(name: str, synthetic: dict) -> Path:
        real = {"t1": {"a": 0.9, "b": 0.6}, "t2": {"a": 0.8, "b": 0.7}}
        tasks = [{"task": t, "candidates": {c: {"real": {key: real[t][c] for key in REAL_KEYS},
                                                "synthetic": {"v": {"all": synthetic[t][c]}}} for c in "ab"}}
                 for t in ("t1", "t2")]
        folder = tmp_path / name / "evaluate" / "selection"
        folder.mkdir(parents=True)
        (folder / "selection.json").write_text(json.dumps({"tasks": tasks}))
        return tmp_path / name

    good = run_folder("good", {"t1": {"a": 0.7, "b": 0.5}, "t2": {"a": 0.9, "b": 0.6}})
    bad = run_folder("bad", {"t1": {"a": 0.5, "b": 0.7}, "t2": {"a": 0.5, "b": 0.6}})
    results = tmp_path / "rows.jsonl"
    rows = selection_runs.main(["--results", str(results), "--run", f"good={good}", "--run", f"bad={bad}"])
    assert [r["label"] for r in rows] == ["good", "bad"]
    assert rows[0]["agreement"]["v"]["all"]["image_AUROC"]["top1_rate"] == 1.0
    assert rows[1]["agreement"]["v"]["all"]["image_AUROC"]["top1_rate"] == 0.0  # picks b on both; a is best
    # good, candidate a: (0.7 - 0.9 + 0.9 - 0.8) / 2 = -0.05
    assert rows[0]["gap"]["v"]["all"]["image_AUROC"]["a"] == pytest.approx(-0.05)
    gaps = selection_runs.gap_table(rows)
    assert "| a | 0.850 | -0.050 | -0.350 |" in gaps.splitlines()
    agreement = selection_runs.agreement_table(rows)
    assert "| good | v | all | 1.00 | 1.00 | 2 / 2 | 0.000 | 0.125 |" in agreement
    again = selection_runs.main(["--results", str(results), "--run", f"good={bad}"])
    assert [r["label"] for r in again] == ["good", "bad"] and len(results.read_text().splitlines()) == 2
    assert again[0]["gap"] == again[1]["gap"]
    # a set that is the same in every run (here: both rows now read the same folder) is shown once
    assert [line.split(" | ")[0] for line in selection_runs.agreement_table(again).splitlines()[2:]] == ["| every run"]
    assert selection_runs.gap_table(again).splitlines()[0] == "| candidate | real AUROC | v (every run) |"
    assert selection_runs.agreement_table(again[:1]).splitlines()[2].startswith("| good | v | all |")
    with pytest.raises(SystemExit, match="no selection"):
        selection_runs.main(["--results", str(results), "--run", f"x={tmp_path}"])
