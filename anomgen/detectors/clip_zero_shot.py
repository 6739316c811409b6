"""Zero-shot CLIP anomaly detection with one pair of prompts.

The normal prompt names the class ("a photo of a cardinal."), the anomalous prompt a generic phrase in the same
template ("a photo of some bird.": :func:`anomgen.selection.prompts.fill_slot` makes the article agree). An image's
anomaly score is the softmax probability of the anomalous prompt over the two, with the cosine similarities of the
L2-normalised embeddings multiplied by the model's logit scale, as in open_clip zero-shot classification.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def anomaly_probabilities(image_features: Tensor, normal_text: Tensor, anomalous_text: Tensor,
                          logit_scale: float | Tensor) -> Tensor:
    """Softmax probability of the anomalous prompt, float64.

    ``image_features`` is B × D; ``normal_text`` and ``anomalous_text`` are D (one pair: the result is B) or P × D
    (P pairs: the result is B × P). Every embedding is L2-normalised here, so the similarities are cosines.
    Computed in float64 so that probabilities near 0 or 1 keep their order.
    """
    if normal_text.shape != anomalous_text.shape:
        raise ValueError(f"normal text features {tuple(normal_text.shape)} and anomalous text features "
                         f"{tuple(anomalous_text.shape)} must have the same shape")
    if image_features.dim() != 2 or normal_text.dim() not in (1, 2) or normal_text.shape[-1] != image_features.shape[1]:
        raise ValueError(f"expected image features B × D and text features D or P × D, got "
                         f"{tuple(image_features.shape)} and {tuple(normal_text.shape)}")
    images = F.normalize(image_features.double(), dim=-1)
    normal = F.normalize(normal_text.double().to(images.device), dim=-1)
    anomalous = F.normalize(anomalous_text.double().to(images.device), dim=-1)
    logits = torch.stack([images @ normal.mT, images @ anomalous.mT] if normal.dim() == 2
                         else [images @ normal, images @ anomalous], dim=-1) * float(logit_scale)
    return logits.softmax(dim=-1)[..., 1]


class CLIPZeroShot:
    """Zero-shot anomaly detector: an open_clip model and a fixed pair of prompts; higher scores are more anomalous.

    ``pretrained`` is an open_clip tag (``"openai"``), a weights file, or ``None`` for random weights; weights are
    found and loaded strictly by :class:`~anomgen.encoders.OpenCLIPImageEncoder`. ``score`` needs the prompt pair
    (given here or with :meth:`set_prompts`); the encoders and :meth:`anomaly_scores` work without one.
    """

    def __init__(self, model_name: str = "ViT-B-16", pretrained: str | None = "openai",
                 normal_text: str | None = None, anomalous_text: str | None = None,
                 device: str | torch.device = "cpu", name: str = "clip_zero_shot") -> None:
        from anomgen.encoders.clip import OpenCLIPImageEncoder

        self.image_encoder = OpenCLIPImageEncoder(model_name, pretrained).to(device).eval()
        self.model_name = self.image_encoder.model_name
        self.model = self.image_encoder.model
        self.device = torch.device(device)
        self.name = name
        self.normal_text: str | None = None
        self.anomalous_text: str | None = None
        self._pair_features: tuple[Tensor, Tensor] | None = None
        if (normal_text is None) != (anomalous_text is None):
            raise ValueError(f"{name}: give both normal_text and anomalous_text, or neither")
        if normal_text is not None:
            self.set_prompts(normal_text, anomalous_text)

    @property
    def logit_scale(self) -> float:
        """The model's multiplier of cosine similarities (``exp`` of its learned log scale; 100 for OpenAI CLIP)."""
        return float(self.model.logit_scale.detach().exp())

    @torch.no_grad()
    def encode_images(self, images: Tensor) -> Tensor:
        """L2-normalised embeddings (B × D, float32, on the model's device) of [0, 1] RGB images B × 3 × H × W."""
        return self.image_encoder(images.to(self.device))

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> Tensor:
        """L2-normalised embeddings (N × D, float32, on the model's device) of ``texts``."""
        return self.image_encoder.embed_texts(texts)

    def anomaly_scores(self, image_features: Tensor, normal_text: str | Tensor, anomalous_text: str | Tensor) -> Tensor:
        """Probability (B, float64) of the anomalous prompt for image features B × D.

        Each prompt is a text or its embedding (D, as :meth:`encode_texts` returns it)."""
        normal, anomalous = (self.encode_texts([t])[0] if isinstance(t, str) else t
                             for t in (normal_text, anomalous_text))
        return anomaly_probabilities(image_features, normal, anomalous, self.logit_scale)

    def set_prompts(self, normal_text: str, anomalous_text: str) -> CLIPZeroShot:
        """Fix the prompt pair that :meth:`score` uses (embedded once, here)."""
        features = self.encode_texts([normal_text, anomalous_text])
        self.normal_text, self.anomalous_text = normal_text, anomalous_text
        self._pair_features = (features[0], features[1])
        return self

    def features(self, batches: Iterable[dict]) -> Tensor:
        """Image embeddings (N × D, float32, CPU) of every record batch in ``batches``, in order."""
        feats = [self.encode_images(batch["image"]).float().cpu() for batch in batches]
        if not feats:
            raise ValueError(f"{self.name}: no images to embed")
        return torch.cat(feats)

    def fit(self, batches: Iterable[dict]) -> CLIPZeroShot:
        """Zero-shot: nothing is learned from normal images (the call exists so that any detector can be fitted)."""
        return self

    def score(self, batches: Iterable[dict]) -> Tensor:
        """Anomaly scores (N, float64, CPU) of every record batch in ``batches`` for the fixed prompt pair."""
        if self._pair_features is None:
            raise ValueError(f"{self.name}: no prompt pair; pass normal_text / anomalous_text or call set_prompts")
        normal, anomalous = self._pair_features
        return anomaly_probabilities(self.features(batches), normal.cpu(), anomalous.cpu(), self.logit_scale)
