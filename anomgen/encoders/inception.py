"""torch-fidelity's FID Inception-v3 as a feature extractor (the standard FID / KID feature space) and as the
Inception Score's classifier (its logits).

Its weights are used only when they are already on this machine: :func:`anomgen.pretrained.inception_weights` finds
the file (nothing is downloaded); this module builds the network.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from anomgen.pretrained import inception_weights, load_torch_file

INCEPTION_FEATURES = ("64", "192", "768", "2048", "logits_unbiased", "logits")
#: the width of each feature layer (the logits are 1008 wide: ImageNet's 1000 classes and 8 unused ones)
INCEPTION_WIDTHS = {"64": 64, "192": 192, "768": 768, "2048": 2048, "logits_unbiased": 1008, "logits": 1008}


class InceptionFeatures(nn.Module):
    """torch-fidelity's FID Inception-v3 as a feature extractor: [0, 1] images B×C×H×W -> B × ``num_features``.

    Images are rounded to 8-bit values (the network's expected input; one grey channel is repeated to three) and
    resized to 299×299 inside the network. ``feature`` picks the layer: "2048" (the standard FID pool features), "768",
    "192" or "64", or the class logits for the Inception Score: "logits_unbiased" (what torch-fidelity and
    torchmetrics compute IS from) or "logits" (with the bias), 1008 wide. The weights come from
    :func:`anomgen.pretrained.inception_weights` (local only); the file is first read with ``weights_only=True``, so a
    file that holds anything but tensors is refused.
    """

    def __init__(self, weights: str | os.PathLike | None = None, feature: str | int = "2048") -> None:
        super().__init__()
        feature = str(feature)
        if feature not in INCEPTION_FEATURES:
            raise ValueError(f"InceptionFeatures: feature must be one of {INCEPTION_FEATURES}, got {feature!r}")
        path = inception_weights(weights)
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
        except ImportError:
            raise ModuleNotFoundError(
                "InceptionFeatures needs torch-fidelity (`pip install torch-fidelity`); or pass another feature "
                "extractor, e.g. anomgen.encoders.RawPixels() for small images"
            ) from None
        load_torch_file(path, "Inception weights file")  # refuse pickled code before torch-fidelity loads it
        self.model = FeatureExtractorInceptionV3("inception-v3-compat", [feature],
                                                 feature_extractor_weights_path=str(path))
        self.model.eval()
        self.num_features = INCEPTION_WIDTHS[feature]
        self.weights_path = path

    def train(self, mode: bool = True) -> InceptionFeatures:
        return super().train(False)  # a fixed feature space: always in evaluation mode

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"InceptionFeatures: expected images B×3×H×W (or B×1×H×W), got {tuple(images.shape)}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        if images.dtype != torch.uint8:
            images = (images.float().clamp(0, 1) * 255).round().to(torch.uint8)
        return self.model(images)[0].reshape(images.shape[0], -1)


__all__ = ["INCEPTION_FEATURES", "INCEPTION_WIDTHS", "InceptionFeatures"]
