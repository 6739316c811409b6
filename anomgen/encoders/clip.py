"""open_clip image (and text) embeddings: [0, 1] images (B × 3 × H × W) -> L2-normalised features (B × D).

The weights file of a tag is found by :func:`anomgen.pretrained.open_clip_weights`; this module builds the model."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from anomgen.pixels import normalize
from anomgen.pretrained import open_clip_weights


def open_clip_architecture(model_name: str, pretrained: str | None) -> str:
    """The open_clip model name that fits the weights of tag ``pretrained``.

    OpenAI's CLIP weights were trained with QuickGELU; open_clip's plain ``ViT-B-16`` config uses GELU and only warns
    about the mismatch, so for such a tag the ``-quickgelu`` twin of the config is used. A weights file or ``None``
    keeps ``model_name`` as given (name the ``-quickgelu`` config yourself for a file of OpenAI weights).
    """
    import open_clip

    if pretrained is None or Path(str(pretrained)).expanduser().is_file():
        return model_name
    tag_cfg = open_clip.get_pretrained_cfg(model_name, str(pretrained))
    model_cfg = open_clip.get_model_config(model_name) or {}
    if not tag_cfg or not tag_cfg.get("quick_gelu") or model_cfg.get("quick_gelu"):
        return model_name
    twin = f"{model_name}-quickgelu"
    if open_clip.get_model_config(twin) is None:
        raise ValueError(f"open_clip weights {model_name}/{pretrained} need QuickGELU, and open_clip has no "
                         f"{twin!r} config; pass a model name whose config sets quick_gelu")
    return twin


def image_preprocessing(model: nn.Module) -> tuple[tuple[int, int], tuple, tuple]:
    """(input size, mean, std) of an open_clip model's image tower (OpenAI's statistics when it names none)."""
    visual = model.visual
    size = getattr(visual, "image_size", 224)
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    mean = getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
    std = getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
    return size, mean, std


def embed_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """L2-normalised image embeddings (B × D, float32) of an open_clip ``model`` for [0, 1] RGB images B × 3 × H × W:
    bicubic resize to the model's input size, its normalisation, ``encode_image``. Gradients flow to the images."""
    size, mean, std = image_preprocessing(model)
    if tuple(images.shape[-2:]) != size:
        images = F.interpolate(images, size=size, mode="bicubic", align_corners=False).clamp(0, 1)
    return F.normalize(model.encode_image(normalize(images, mean, std)).float(), dim=-1)


class OpenCLIPImageEncoder(nn.Module):
    """L2-normalised image embeddings of an open_clip model (CLIP, SigLIP: EAP's ViT-B-16-SigLIP by default).

    ``pretrained`` is an open_clip tag (``"webli"``, ``"openai"``, ...: its weights file is found by
    :func:`anomgen.pretrained.open_clip_weights`, offline-safe, with a clear error when absent), a path to a weights
    file (loaded strictly), or ``None`` for random weights. Images come in as [0, 1] RGB; they are resized to the
    model's input size and normalised with the model's own statistics.
    """

    def __init__(self, model_name: str = "ViT-B-16-SigLIP", pretrained: str | None = "webli") -> None:
        super().__init__()
        import open_clip

        weights = None if pretrained is None else str(open_clip_weights(model_name, str(pretrained)))
        #: the architecture built: ``model_name``, or its ``-quickgelu`` twin for weights trained with QuickGELU
        self.model_name = open_clip_architecture(model_name, None if pretrained is None else str(pretrained))
        self.model = open_clip.create_model(self.model_name, pretrained=weights).eval()
        self.image_size, self.mean, self.std = image_preprocessing(self.model)
        self._tokenizer = None

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The embeddings with gradients flowing back to the images (a CLIP loss on generated images)."""
        return embed_images(self.model, images)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(images)

    @property
    def tokenizer(self):
        """The model's open_clip tokenizer, made on first use (SigLIP's is a Hugging Face tokenizer that image-only
        use never needs)."""
        if self._tokenizer is None:
            import open_clip

            self._tokenizer = open_clip.get_tokenizer(self.model_name)
        return self._tokenizer

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings (N × D, float32, on the model's device) of a non-empty list of strings."""
        if isinstance(texts, str) or not texts:
            raise ValueError(f"{self.model_name}: embed_texts takes a non-empty list of strings, got {texts!r}")
        tokens = self.tokenizer(list(texts)).to(next(self.model.parameters()).device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)
