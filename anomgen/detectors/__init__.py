"""Anomaly detectors: kNN feature bank, CLIP zero-shot, WinCLIP / WinCLIP+, SSDO, the U-Net localizer; the PCA
post-transform of their features and the squashing scaler that turns scores into probabilities.

The feature extractors they use live in :mod:`anomgen.encoders`.
"""

from anomgen.detectors.clip_zero_shot import CLIPZeroShot
from anomgen.detectors.knn import KNNScorer
from anomgen.detectors.knn_detector import KNNDetector
from anomgen.detectors.localizer import UNetLocalizer
from anomgen.detectors.pca import PCAReducer
from anomgen.detectors.squashing import SquashingScaler
from anomgen.detectors.ssdo import SSDO
from anomgen.detectors.winclip import WinCLIP

__all__ = [
    "SSDO",
    "CLIPZeroShot",
    "KNNDetector",
    "KNNScorer",
    "PCAReducer",
    "SquashingScaler",
    "UNetLocalizer",
    "WinCLIP",
]
