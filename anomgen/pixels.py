"""The one place where images change range, size and crop.

Every dataset yields float images in [0, 1], CHW, RGB. A model that wants another range gets it through one of the
named helpers below, never through inline arithmetic. Resizing and cropping of [0, 1] batches (B × C × H × W), at test
time (:func:`resize`, :func:`resize_shorter`, :func:`center_crop`) and at train time (:func:`augment_batch`), live here
too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# open_clip.constants.OPENAI_DATASET_MEAN / STD
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: the kinds of train-time augmentation of :func:`augment_batch`
AUGMENTATIONS = ("pad_crop", "resize_crop")


def to_diffusion_range(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1], the range diffusion models are trained in."""
    return images * 2.0 - 1.0


def from_diffusion_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped (samplers overshoot)."""
    return ((images + 1.0) / 2.0).clamp(0.0, 1.0)


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """[0, 1] RGB -> (x − mean) / std per channel, for encoders whose config names their own statistics
    (e.g. SigLIP's 0.5 / 0.5); the named conventions below use it."""
    return _normalize(images, mean, std)


def _normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    shape = (1, -1, 1, 1) if images.dim() == 4 else (-1, 1, 1)
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(shape)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(shape)
    return (images - mean_t) / std_t


def imagenet_normalize(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB -> ImageNet-normalised input of torchvision / timm encoders."""
    return _normalize(images, IMAGENET_MEAN, IMAGENET_STD)


def clip_normalize(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] RGB -> CLIP-normalised input of open_clip / transformers CLIP image towers."""
    return _normalize(images, CLIP_MEAN, CLIP_STD)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] float -> uint8 in [0, 255], rounded (what a PNG stores)."""
    return (images.clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)


def resize(images: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Antialiased resize of [0, 1] images (``mode``: ``"bilinear"`` or ``"bicubic"``, the interpolation CLIP
    models were trained with), clamped to [0, 1]."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=size, mode=mode, antialias=True, align_corners=False).clamp(0.0, 1.0)


def resize_shorter(images: torch.Tensor, shorter: int) -> torch.Tensor:
    """Resize so that the shorter side is ``shorter`` (the aspect ratio kept), like torchvision's ``Resize(int)``."""
    h, w = images.shape[-2:]
    if h <= w:
        size = (shorter, max(1, int(shorter * w / h)))
    else:
        size = (max(1, int(shorter * h / w)), shorter)
    return resize(images, size)


def center_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    h, w = images.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot centre-crop {size} px from {h}×{w} images")
    top, left = round((h - size) / 2.0), round((w - size) / 2.0)
    return images[..., top : top + size, left : left + size]


def augment_batch(
    images: torch.Tensor,
    image_size: int,
    kind: str | None = "pad_crop",
    padding: int = 4,
    padding_mode: str = "reflect",
    resize_to: int | None = None,
    flip: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Train-time augmentation of [0, 1] images (B × 3 × H × W) -> B × 3 × image_size × image_size, per sample.

    - ``"resize_crop"`` (FITYMI's ViT-B/16 recipe): resize the shorter side to ``resize_to`` (default
      ``round(image_size · 256 / 224)``), random crop ``image_size``.
    - ``"pad_crop"`` (small images): resize to ``image_size``, pad each side by ``padding`` (``padding_mode``:
      reflect, replicate or constant zeros), random crop ``image_size``.
    - ``None``: resize to ``image_size`` only.

    Then, with ``flip``, a horizontal flip with probability 1/2. Draws come from ``generator`` (or torch's global
    generator, seeded by Lightning's ``seed_everything``).
    """
    if kind not in (None, *AUGMENTATIONS):
        raise ValueError(f"augmentation kind must be one of {AUGMENTATIONS} or null, got {kind!r}")
    if kind == "resize_crop":
        images = resize_shorter(images, int(resize_to or round(image_size * 256 / 224)))
    else:
        images = resize(images, (image_size, image_size))
        if kind == "pad_crop" and padding > 0:
            if padding_mode == "constant":
                images = F.pad(images, [padding] * 4, mode="constant", value=0.0)
            else:
                images = F.pad(images, [padding] * 4, mode=padding_mode)
    n, _, h, w = images.shape
    if (h, w) != (image_size, image_size):
        tops = torch.randint(0, h - image_size + 1, (n,), generator=generator).tolist()
        lefts = torch.randint(0, w - image_size + 1, (n,), generator=generator).tolist()
        images = torch.stack([img[:, top : top + image_size, left : left + image_size]
                              for img, top, left in zip(images, tops, lefts, strict=True)])
    if flip:
        flips = (torch.rand(n, generator=generator) < 0.5).to(images.device)
        images = torch.where(flips[:, None, None, None], images.flip(-1), images)
    return images
