"""Anomaly detectors and the feature extractors they use."""

from anomgen.detectors.backbones import BackboneFeatures, ViTBackbone, build_vit
from anomgen.detectors.features import OpenCLIPImageEncoder, RawPixels, extract_features
from anomgen.detectors.knn import KNNScorer
from anomgen.detectors.knn_detector import KNNDetector
from anomgen.detectors.ssdo import SSDO

__all__ = [
    "SSDO",
    "BackboneFeatures",
    "KNNDetector",
    "KNNScorer",
    "OpenCLIPImageEncoder",
    "RawPixels",
    "ViTBackbone",
    "build_vit",
    "extract_features",
]
