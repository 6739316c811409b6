"""Anomaly detectors and the feature extractors they use."""

from anomgen.detectors.backbones import BackboneFeatures, ViTBackbone, build_vit
from anomgen.detectors.clip_zero_shot import CLIPZeroShot
from anomgen.detectors.extractors import (
    DownsampledPixels,
    HOGFeatures,
    PCAReducer,
    RandomConvFeatures,
    TorchvisionFeatures,
)
from anomgen.detectors.features import OpenCLIPImageEncoder, RawPixels, extract_features
from anomgen.detectors.knn import KNNScorer
from anomgen.detectors.knn_detector import KNNDetector
from anomgen.detectors.ssdo import SSDO

__all__ = [
    "SSDO",
    "BackboneFeatures",
    "CLIPZeroShot",
    "DownsampledPixels",
    "HOGFeatures",
    "KNNDetector",
    "KNNScorer",
    "OpenCLIPImageEncoder",
    "PCAReducer",
    "RandomConvFeatures",
    "TorchvisionFeatures",
    "RawPixels",
    "ViTBackbone",
    "build_vit",
    "extract_features",
]
