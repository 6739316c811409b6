"""The one place where images change range, size and crop.

Every dataset yields float images in [0, 1], CHW, RGB. A model that wants another range gets it through one of the
named helpers below, never through inline arithmetic. Resizing and cropping of [0, 1] batches (B × C × H × W), at test
time (:func:`resize`, :func:`resize_shorter`, :func:`center_crop`) and at train time (:func:`augment_batch`), live here
too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# open_clip.constants.OPENAI_DATASET_MEAN / STD
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
#: the kinds of train-time augmentation of :func:`augment_batch`
AUGMENTATIONS = ("pad_crop", "resize_crop")
#: torchvision's ``RandomResizedCrop`` defaults: the crop's share of the image area, its aspect-ratio range (w / h)
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)


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


def random_resized_crop_box(height: int, width: int, scale: tuple[float, float] = CROP_SCALE,
                            ratio: tuple[float, float] = CROP_RATIO,
                            generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """The ``(top, left, h, w)`` box of a random resized crop of an ``height`` × ``width`` image: torchvision's
    ``RandomResizedCrop.get_params`` (area share in ``scale``, log-uniform aspect ratio w / h in ``ratio``, ten tries,
    then the centre crop of the clamped ratio), with every draw from ``generator``. With torch's global generator in
    the same state as ``generator``, the box is torchvision's."""
    if not 0.0 < scale[0] <= scale[1]:
        raise ValueError(f"crop scale must satisfy 0 < min <= max, got {tuple(scale)}")
    if not 0.0 < ratio[0] <= ratio[1]:
        raise ValueError(f"crop ratio must satisfy 0 < min <= max, got {tuple(ratio)}")
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(images: torch.Tensor, box: tuple[int, int, int, int], size: tuple[int, int]) -> torch.Tensor:
    """The ``(top, left, h, w)`` box of [0, 1] images (C × H × W or B × C × H × W), resized to ``size`` by
    :func:`resize` (bilinear, antialiased: torchvision's ``RandomResizedCrop`` interpolation)."""
    top, left, h, w = box
    crop = images[..., top : top + h, left : left + w]
    batch = crop if crop.dim() == 4 else crop.unsqueeze(0)
    out = resize(batch, tuple(size))
    return out if images.dim() == 4 else out[0]
