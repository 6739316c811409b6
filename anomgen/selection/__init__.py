"""Scoring detectors on real and synthetic validation data; model and prompt selection."""

from anomgen.selection.evaluation import (
    PIXEL_KEYS,
    PixelMetrics,
    dataset_has_masks,
    has_anomaly_maps,
    image_metrics,
    score_dataset,
    scores_and_maps,
)
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
    "PIXEL_KEYS",
    "REAL_KEYS",
    "Candidate",
    "FeatureCache",
    "PixelMetrics",
    "PromptPool",
    "SelectionResult",
    "SelectionTask",
    "candidates_from_config",
    "dataset_has_masks",
    "has_anomaly_maps",
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
    "scores_and_maps",
    "select_models",
    "select_prompts",
    "summarize",
    "write_selection_report",
]
