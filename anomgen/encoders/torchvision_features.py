"""Torchvision classifiers as feature extractors: [0, 1] images (B × 3 × H × W) -> features (B × D, float32).

:class:`TorchvisionFeatures`: torchvision ResNet-18/34/50/101/152 (global-average-pooled penultimate features) and
ViT-B/16, B/32, L/16, L/32, H/14 (CLS token after the final LayerNorm), the classification head removed. It has a
``name`` (what a feature cache and a report call it). The weights file is found by
:func:`anomgen.pretrained.torchvision_weights`; this module builds the model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from anomgen.encoders.base import check_images, square
from anomgen.pixels import imagenet_normalize
from anomgen.pretrained import load_state_dict_strict, load_weights_file, torchvision_weights

RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
VIT_ARCHS = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")
TORCHVISION_ARCHS = RESNET_ARCHS + VIT_ARCHS


class TorchvisionFeatures(nn.Module):
    """Penultimate features of a torchvision classifier, its head removed.

    ``pretrained``: a torchvision weights name of ``arch`` (``"IMAGENET1K_V1"``, ``"DEFAULT"``, ...; the file is
    found by :func:`anomgen.pretrained.torchvision_weights`, which fails fast offline with how to
    supply it), a local weights file (a torchvision state dict, with or without its head), or ``None`` for random
    weights. Loading is strict. Images are resized to ``image_size`` (bilinear, antialiased) and
    ImageNet-normalised; a ViT is built at ``image_size`` (a multiple of its patch size) and named weights made at
    another resolution get their position embedding interpolated.
    """

    def __init__(self, arch: str = "resnet18", pretrained: str | os.PathLike | None = "IMAGENET1K_V1",
                 image_size: int = 224, name: str | None = None) -> None:
        super().__init__()
        from torchvision.models import get_model

        if arch not in TORCHVISION_ARCHS:
            raise ValueError(f"unknown torchvision arch {arch!r}; known: {', '.join(TORCHVISION_ARCHS)}")
        self.arch, self.image_size, self.is_vit = arch, int(image_size), arch in VIT_ARCHS
        patch = int(arch.rsplit("_", 1)[1]) if self.is_vit else 1
        if self.image_size % patch:
            raise ValueError(f"{arch}: image_size {self.image_size} is not a multiple of the patch size {patch}")
        self.pretrained = None if pretrained is None else str(pretrained)
        # the file is found before the model is built, so that a missing file fails fast
        weights = None if self.pretrained is None else torchvision_weights(arch, self.pretrained)
        named = weights is not None and not Path(self.pretrained).expanduser().is_file()
        model = get_model(arch, weights=None, **({"image_size": self.image_size} if self.is_vit else {}))
        if self.is_vit:
            model.heads = nn.Identity()
        else:
            model.fc = nn.Identity()
        self.model = model.eval()
        if weights is not None:
            self._load(weights, named)
        for p in self.model.parameters():
            p.requires_grad_(False)
        label = "random" if self.pretrained is None else Path(self.pretrained).stem
        self.name = name or f"{arch}-{label}-{self.image_size}"

    def _load(self, file: Path, named: bool) -> None:
        state = load_weights_file(file)
        head = "heads." if self.is_vit else "fc."
        state = {k: v for k, v in state.items() if not k.startswith(head)}
        own = self.model.state_dict().get("encoder.pos_embedding")
        theirs = state.get("encoder.pos_embedding")
        if named and own is not None and theirs is not None and theirs.shape != own.shape:
            from torchvision.models.vision_transformer import interpolate_embeddings

            state = dict(interpolate_embeddings(self.image_size, self.model.patch_size, state))
        load_state_dict_strict(self.model, state, str(file))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images(images, self.name)
        return self.model(imagenet_normalize(square(images, self.image_size))).float()


__all__ = ["RESNET_ARCHS", "TORCHVISION_ARCHS", "VIT_ARCHS", "TorchvisionFeatures"]
