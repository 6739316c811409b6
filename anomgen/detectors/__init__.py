"""Anomaly detectors and the feature extractors they use."""

from anomgen.detectors.features import OpenCLIPImageEncoder, RawPixels, extract_features
from anomgen.detectors.knn import KNNScorer
from anomgen.detectors.knn_detector import KNNDetector
from anomgen.detectors.ssdo import SSDO

__all__ = ["SSDO", "KNNDetector", "KNNScorer", "OpenCLIPImageEncoder", "RawPixels", "extract_features"]
