"""The model-selection report (anomgen.selection.report): markdown tables, JSON and scatter plots, written
atomically."""

from __future__ import annotations

import json

import pytest

from anomgen.selection.model_selection import REAL_KEYS, Candidate, SelectionResult, rank_agreement, summarize
from anomgen.selection.report import plot_real_vs_synthetic, render_selection_markdown, write_selection_report

REAL = {"t1": {"resnet18": 0.91, "vit_b_16": 0.97, "hog": 0.62},
        "t2": {"resnet18": 0.88, "vit_b_16": 0.93, "hog": 0.70}}
SYNTHETIC = {"t1": {"diffstyle": {"resnet18": 0.85, "vit_b_16": 0.90, "hog": 0.55},
                    "noise": {"resnet18": 0.99, "vit_b_16": 0.97, "hog": 0.95}},
             "t2": {"diffstyle": {"resnet18": 0.80, "vit_b_16": 0.80, "hog": 0.80},  # constant: no correlation
                    "noise": {"resnet18": 0.90, "vit_b_16": 0.98, "hog": 0.60}}}


def _result() -> SelectionResult:
    """A result with two tasks, two validation sets and K in (3, all); the K = 3 AUROCs are 0.05 below."""
    tasks = []
    for task, real in REAL.items():
        candidates = {}
        for c, value in real.items():
            synthetic = {vs: {"3": v[c] - 0.05, "all": v[c]} for vs, v in SYNTHETIC[task].items()}
            real_metrics = {key: value - 0.01 * i for i, key in enumerate(REAL_KEYS)}
            candidates[c] = {"real": real_metrics, "synthetic": synthetic}
        tasks.append({"task": task, "candidates": candidates})
    return SelectionResult([Candidate("resnet18", "resnet18"), Candidate("vit_b_16", "vit_b_16", k=5),
                            Candidate("hog", "hog", reducer="pca:16")], [3, None], tasks, summarize(tasks))


def test_markdown_holds_the_candidates_the_agreement_and_the_per_task_selection():
    result = _result()
    text = render_selection_markdown(result)
    lines = text.splitlines()
    assert lines[0] == "# Model selection by synthetic validation"
    mean_row = next(line for line in lines if line.startswith("| vit_b_16 |"))
    # mean real one-vs-rest (0.97 + 0.93) / 2, synthetic diffstyle (0.90 + 0.80) / 2, noise (0.97 + 0.98) / 2
    assert mean_row == "| vit_b_16 | vit_b_16 | 5 | euclidean | - | 0.950 | 0.940 | 0.930 | 0.850 | 0.975 |"
    assert "| hog | hog | 3 | euclidean | pca:16 |" in text
    # synthetic - real one-vs-rest per task: diffstyle (-0.07, -0.13), noise (0.00, +0.05)
    assert "| vit_b_16 | -0.100 / 0.100 | 0.025 / 0.025 |" in lines
    assert sum(line.startswith(("| diffstyle |", "| noise |")) for line in lines) == 2 * 2 * 3  # set × K × benchmark
    assert sum(line.startswith(("| t1 |", "| t2 |")) for line in lines) == 2 * 2  # per task × set
    t1 = rank_agreement(REAL["t1"], SYNTHETIC["t1"]["diffstyle"])
    row = f"| t1 | diffstyle | {t1['selected']} | {t1['best']} | {t1['selected_real']:.3f} | {t1['best_real']:.3f} |"
    assert row in text
    # constant synthetic AUROC: the first candidate is selected, and there is no correlation
    assert "| t2 | diffstyle | resnet18 | vit_b_16 | 0.880 | 0.930 | 0.050 | no | n/a |" in lines
    closest = render_selection_markdown(result, benchmark="image_AUROC_one_vs_one_closest", k="3")
    assert "## Per-task selection (one-vs-one closest, K = 3)" in closest
    with pytest.raises(ValueError, match="K '7' not in the result"):
        render_selection_markdown(result, k="7")


def test_write_selection_report_writes_every_file_atomically(tmp_path):
    result = _result()
    written = write_selection_report(result, tmp_path / "report")
    scatters = {f"scatter_{vs}_{key}.png" for vs in ("diffstyle", "noise") for key in REAL_KEYS}
    assert set(written) == {"selection.md", "selection.json", *scatters}
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(written)  # no temporary files
    for name in scatters:
        assert written[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert written["selection.md"].read_text() == render_selection_markdown(result)
    data = json.loads(written["selection.json"].read_text())
    assert data == result.to_dict()
    assert data["summary"]["per_task"]["t2"]["diffstyle"]["all"]["image_AUROC"]["spearman"] is None  # NaN -> null
    assert data["summary"]["agreement"]["noise"]["all"]["image_AUROC"]["dataset"]["selected"] == "vit_b_16"


def test_scatter_plot_arguments_are_checked(tmp_path):
    result = _result()
    path = plot_real_vs_synthetic(result, tmp_path / "f.png", benchmark="image_AUROC_one_vs_one_mean",
                                  validation_set="noise", k="3")
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no 'digits'"):
        plot_real_vs_synthetic(result, tmp_path / "g.png", validation_set="digits")
    assert not (tmp_path / "g.png").exists()
