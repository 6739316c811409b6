"""Scoring detectors on real and synthetic validation data; model and prompt selection."""

from anomgen.selection.evaluation import image_metrics, score_dataset

__all__ = ["image_metrics", "score_dataset"]
