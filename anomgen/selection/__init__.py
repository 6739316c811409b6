"""Scoring detectors on real and synthetic validation data; model and prompt selection."""

from anomgen.selection.evaluation import image_metrics, score_dataset
from anomgen.selection.features import FeatureCache
from anomgen.selection.model_selection import (
    REAL_KEYS,
    Candidate,
    SelectionResult,
    SelectionTask,
    candidates_from_config,
    k_lowest_auroc,
    rank_agreement,
    score_task,
    select_models,
    summarize,
)
from anomgen.selection.prompts import PromptPool, prompt_aurocs, rank_aurocs, render_prompt_table, select_prompts
from anomgen.selection.report import plot_real_vs_synthetic, render_selection_markdown, write_selection_report

__all__ = [
    "REAL_KEYS",
    "Candidate",
    "FeatureCache",
    "PromptPool",
    "SelectionResult",
    "SelectionTask",
    "candidates_from_config",
    "image_metrics",
    "k_lowest_auroc",
    "plot_real_vs_synthetic",
    "prompt_aurocs",
    "rank_agreement",
    "rank_aurocs",
    "render_prompt_table",
    "render_selection_markdown",
    "score_dataset",
    "score_task",
    "select_models",
    "select_prompts",
    "summarize",
    "write_selection_report",
]
