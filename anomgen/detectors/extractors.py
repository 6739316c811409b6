"""Feature extractors for model selection: [0, 1] images (B × 3 × H × W) -> features (B × D, float32).

Every extractor has a ``name`` (what a feature cache and a report call it):

- :class:`TorchvisionFeatures`: torchvision ResNet-18/34/50/101/152 (global-average-pooled penultimate features)
  and ViT-B/16, B/32, L/16, L/32, H/14 (CLS token after the final LayerNorm), the classification head removed.
- :class:`HOGFeatures`: histograms of oriented gradients of the grey image (scikit-image).
- :class:`DownsampledPixels`: the image averaged down to ``size × size`` (area resize), colour kept.
- :class:`RandomConvFeatures`: a small randomly initialised CNN, fixed by ``seed``, global-average-pooled.
- :func:`raw_pixels`: :class:`anomgen.detectors.features.RawPixels` with a name.

:class:`PCAReducer` is a post-transform fitted on a feature bank (a candidate's ``reducer="pca:<d>"``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from anomgen.detectors.backbones import resize
from anomgen.detectors.features import RawPixels
from anomgen.pixels import imagenet_normalize

RESNET_ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
VIT_ARCHS = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")
TORCHVISION_ARCHS = RESNET_ARCHS + VIT_ARCHS


def _check_images(images: torch.Tensor, name: str) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name}: images must be B × 3 × H × W in [0, 1], got shape {tuple(images.shape)}")


def _square(images: torch.Tensor, size: int | None) -> torch.Tensor:
    return images if size is None else resize(images, (size, size))


class TorchvisionFeatures(nn.Module):
    """Penultimate features of a torchvision classifier, its head removed.

    ``pretrained``: a torchvision weights name of ``arch`` (``"IMAGENET1K_V1"``, ``"DEFAULT"``, ...; the file is
    found by :func:`anomgen.detectors.backbones.torchvision_weights_path`, which fails fast offline with how to
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
        weights = None if self.pretrained is None else self._weights_file(self.pretrained)  # fail before building
        model = get_model(arch, weights=None, **({"image_size": self.image_size} if self.is_vit else {}))
        if self.is_vit:
            model.heads = nn.Identity()
        else:
            model.fc = nn.Identity()
        self.model = model.eval()
        if weights is not None:
            self._load(*weights)
        for p in self.model.parameters():
            p.requires_grad_(False)
        label = "random" if self.pretrained is None else Path(self.pretrained).stem
        self.name = name or f"{arch}-{label}-{self.image_size}"

    def _weights_file(self, pretrained: str) -> tuple[Path, bool]:
        """(the local file of ``pretrained``, whether it was given as a torchvision weights name)."""
        from anomgen.detectors.backbones import torchvision_weights_path

        file = Path(pretrained).expanduser()
        if file.is_file():
            return file, False
        from torchvision.models import get_model_weights

        names = ["DEFAULT", *get_model_weights(self.arch).__members__]
        if pretrained not in names:
            raise ValueError(f"{self.arch}: pretrained {pretrained!r} is neither a file nor a torchvision weights name;"
                             f" its weights: {', '.join(names)}")
        return torchvision_weights_path(self.arch, pretrained), True

    def _load(self, file: Path, named: bool) -> None:
        from anomgen.pretrained import load_state_dict_strict, load_weights_file

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
        _check_images(images, self.name)
        return self.model(imagenet_normalize(_square(images, self.image_size))).float()


class HOGFeatures(nn.Module):
    """HOG descriptor (:func:`skimage.feature.hog`, L2-Hys blocks) of the grey image (mean over RGB), after a
    resize to ``image_size`` (``None``: as given). Computed on the CPU, one image at a time."""

    def __init__(self, image_size: int | None = 64, orientations: int = 9, pixels_per_cell: int = 8,
                 cells_per_block: int = 2, name: str | None = None) -> None:
        super().__init__()
        self.image_size = None if image_size is None else int(image_size)
        self.orientations, self.pixels_per_cell = int(orientations), int(pixels_per_cell)
        self.cells_per_block = int(cells_per_block)
        if self.image_size is not None:
            self._check_size(self.image_size, self.image_size)
        self.name = name or (f"hog-{self.image_size or 'native'}-o{self.orientations}-p{self.pixels_per_cell}"
                             f"-b{self.cells_per_block}")

    def _check_size(self, height: int, width: int) -> None:
        cells = min(height, width) // self.pixels_per_cell
        if cells < self.cells_per_block:
            raise ValueError(f"{type(self).__name__}: {height}×{width} images hold {cells} cells of "
                             f"{self.pixels_per_cell} px per side, fewer than cells_per_block = {self.cells_per_block}"
                             "; raise image_size or lower pixels_per_cell")

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from skimage.feature import hog

        _check_images(images, self.name)
        grey = _square(images, self.image_size).mean(dim=1).detach().cpu().double().numpy()
        self._check_size(*grey.shape[-2:])
        feats = [hog(g, orientations=self.orientations, pixels_per_cell=(self.pixels_per_cell,) * 2,
                     cells_per_block=(self.cells_per_block,) * 2, block_norm="L2-Hys", feature_vector=True)
                 for g in grey]
        return torch.from_numpy(np.stack(feats)).float().to(images.device)


class DownsampledPixels(nn.Module):
    """The image averaged down to ``size × size`` (area resize: each output pixel is the mean of its input
    region), colour (or grey, the mean over RGB) kept, flattened."""

    def __init__(self, size: int = 8, grayscale: bool = False, name: str | None = None) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"DownsampledPixels: size must be >= 1, got {size}")
        self.size, self.grayscale = int(size), bool(grayscale)
        self.name = name or f"pixels-{self.size}{'-grey' if self.grayscale else ''}"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, self.name)
        out = F.interpolate(images.float(), size=(self.size, self.size), mode="area")
        if self.grayscale:
            out = out.mean(dim=1, keepdim=True)
        return out.flatten(1)


class RandomConvFeatures(nn.Module):
    """A randomly initialised CNN, the same for the same ``seed`` (the global random state is not touched).

    ``depth`` blocks of 3×3 convolution + ReLU with ``channels`` channels, every block after the first with stride
    2; the output is average-pooled over space (B × ``channels``). Input: ImageNet-normalised, resized to
    ``image_size`` when given. Weights: Kaiming-normal (fan-in, ReLU gain), biases zero.
    """

    def __init__(self, channels: int = 64, depth: int = 3, seed: int = 0, image_size: int | None = None,
                 name: str | None = None) -> None:
        super().__init__()
        if channels < 1 or depth < 1:
            raise ValueError(f"RandomConvFeatures: channels and depth must be >= 1, got {channels}, {depth}")
        self.channels, self.depth, self.seed = int(channels), int(depth), int(seed)
        self.image_size = None if image_size is None else int(image_size)
        layers: list[nn.Module] = []
        for i in range(self.depth):
            layers += [nn.Conv2d(3 if i == 0 else self.channels, self.channels, 3, stride=1 if i == 0 else 2,
                                 padding=1, device="meta"), nn.ReLU()]
        self.body = nn.Sequential(*layers).to_empty(device="cpu")
        generator = torch.Generator().manual_seed(self.seed)
        for layer in self.body:
            if isinstance(layer, nn.Conv2d):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu", generator=generator)
                nn.init.zeros_(layer.bias)
        for p in self.parameters():
            p.requires_grad_(False)
        self.name = name or f"randconv-c{self.channels}-d{self.depth}-s{self.seed}"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _check_images(images, self.name)
        return self.body(imagenet_normalize(_square(images, self.image_size))).mean(dim=(2, 3)).float()


def raw_pixels(image_size: int | None = None, grayscale: bool = True, name: str | None = None) -> RawPixels:
    """:class:`anomgen.detectors.features.RawPixels` with a ``name`` (``pixels-raw``, ``pixels-raw-32-rgb``, ...)."""
    module = RawPixels(image_size=image_size, grayscale=grayscale)
    size = "" if image_size is None else f"-{image_size}"
    module.name = name or f"pixels-raw{size}{'' if grayscale else '-rgb'}"
    return module


class PCAReducer:
    """PCA fitted on a feature bank: ``fit(bank)`` then ``transform(features)`` -> N × ``n_components_``.

    The bank's mean is removed and the features are projected on its top right singular vectors (computed in
    float64), each signed so that its largest-magnitude loading is positive. ``n_components`` is capped at
    ``min(N, D)`` of the bank (``n_components_`` holds what was used).
    """

    def __init__(self, n_components: int) -> None:
        if n_components < 1:
            raise ValueError(f"PCAReducer: n_components must be >= 1, got {n_components}")
        self.n_components = int(n_components)
        self.mean_: torch.Tensor | None = None
        self.components_: torch.Tensor | None = None

    @property
    def n_components_(self) -> int:
        if self.components_ is None:
            raise RuntimeError("PCAReducer.fit(bank) must be called first")
        return int(self.components_.shape[0])

    def fit(self, bank: torch.Tensor) -> PCAReducer:
        bank = torch.as_tensor(bank).detach().cpu().double()
        if bank.dim() != 2 or len(bank) < 2:
            raise ValueError(f"PCAReducer: the bank must be N × D with N >= 2, got shape {tuple(bank.shape)}")
        self.mean_ = bank.mean(0)
        _, _, vh = torch.linalg.svd(bank - self.mean_, full_matrices=False)
        vh = vh[: min(self.n_components, *bank.shape)]
        signs = torch.sign(vh.gather(1, vh.abs().argmax(1, keepdim=True)))
        self.components_ = vh * signs
        return self

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        if self.components_ is None:
            raise RuntimeError("PCAReducer.fit(bank) must be called before transform")
        features = torch.as_tensor(features).detach().cpu().double()
        if features.dim() != 2 or features.shape[1] != self.components_.shape[1]:
            raise ValueError(f"PCAReducer: features must be M × {self.components_.shape[1]}, got "
                             f"{tuple(features.shape)}")
        return ((features - self.mean_) @ self.components_.T).float()

    def fit_transform(self, bank: torch.Tensor) -> torch.Tensor:
        return self.fit(bank).transform(bank)


__all__ = [
    "RESNET_ARCHS",
    "TORCHVISION_ARCHS",
    "VIT_ARCHS",
    "DownsampledPixels",
    "HOGFeatures",
    "PCAReducer",
    "RandomConvFeatures",
    "TorchvisionFeatures",
    "raw_pixels",
]
