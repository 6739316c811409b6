"""Vision-transformer backbones for FITYMI-style outlier exposure and kNN scoring.

A :class:`ViTBackbone` wraps a torchvision ``VisionTransformer`` without its classification head and maps [0, 1]
images (B × 3 × H × W) to the CLS token after the final LayerNorm, the feature FITYMI scores with kNN.

Architectures (:func:`build_vit`):

- ``"vit_b_16"``: torchvision's ViT-B/16 (the paper's detector). ``pretrained`` is a torchvision weights name
  (``"IMAGENET1K_V1"``, ``"IMAGENET1K_SWAG_LINEAR_V1"``, ``"IMAGENET1K_SWAG_E2E_V1"``; see
  :func:`anomgen.pretrained.torchvision_weights` for where the file is looked for), a local weights file, or a
  backbone saved by :func:`save_backbone`.
- ``"vit_small"``: the same torchvision class sized by config (e.g. 32 px, patch 4, 6 blocks of width 128) for the
  shipped 8×8 / 28×28 data. ``pretrained`` is a backbone saved by :func:`save_backbone` (e.g. by
  ``model=backbone_pretrain``) or a plain ``VisionTransformer`` state dict.

Every weight file loads strictly (:func:`anomgen.pretrained.load_state_dict_strict`).

Input handling, one place for both train and test time:

- test time (:meth:`ViTBackbone.prepare`): an image of another size is resized to ``image_size`` or, with
  ``resize_to``, resized (shorter side) to ``resize_to`` and centre-cropped to ``image_size`` (FITYMI: 256 -> 224);
  then ImageNet-normalised by :func:`anomgen.pixels.imagenet_normalize`.
- train time (:func:`anomgen.pixels.augment_batch`): ``"resize_crop"`` (FITYMI: resize to ``resize_to``, random crop
  ``image_size``, horizontal flip) or ``"pad_crop"`` (small images: resize to ``image_size``, pad by ``padding``,
  random crop back, horizontal flip), applied to [0, 1] images before the backbone.

A backbone file (:func:`save_backbone` / :func:`load_backbone`) is a torch file holding the architecture config,
the state dict and an ``info`` dict (what it was trained on); :class:`BackboneFeatures` is the detector-side feature
extractor that reads one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from anomgen.errors import PretrainedNotFoundError
from anomgen.pixels import center_crop, imagenet_normalize, resize, resize_shorter
from anomgen.pretrained import (
    backbone_weights,
    load_state_dict_strict,
    load_torch_file,
    load_weights_file,
    resolve,
)

ARCHS = ("vit_small", "vit_b_16")
BACKBONE_FORMAT = "anomgen.vit_backbone/1"
#: the sizes of torchvision's ViT-B/16
VIT_B_16 = {"patch_size": 16, "num_layers": 12, "num_heads": 12, "hidden_dim": 768, "mlp_dim": 3072}
#: the default small ViT for the shipped 8×8 / 28×28 data (resized to 32 px)
VIT_SMALL = {"patch_size": 4, "num_layers": 6, "num_heads": 4, "hidden_dim": 128, "mlp_dim": 256}
#: config keys that fix the parameter shapes; a saved backbone must agree on them with the config that loads it
ARCH_KEYS = ("arch", "image_size", "patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim")


# ---------------------------------------------------------------------------------------------------------- backbone


class ViTBackbone(nn.Module):
    """A torchvision ViT without its head: [0, 1] images -> CLS token after the final LayerNorm (B × hidden_dim).

    ``blocks`` are the encoder blocks (for freezing); :meth:`freeze_blocks` freezes the patch embedding, the class
    token, the position embedding and the first ``n`` blocks. ``config`` holds what :func:`build_vit` needs to
    rebuild the architecture.
    """

    def __init__(self, vit: nn.Module, config: Mapping[str, Any]) -> None:
        super().__init__()
        vit.heads = nn.Identity()  # the classification head is never part of the backbone
        self.vit = vit
        self.config = dict(config)
        self.image_size = int(vit.image_size)
        self.resize_to = config.get("resize_to")
        self.frozen_blocks = 0
        self.info: dict = {}  # what the loaded weights were trained on (from the backbone file)

    @property
    def feature_dim(self) -> int:
        return int(self.vit.hidden_dim)

    @property
    def blocks(self) -> nn.Sequential:
        """The encoder blocks, in order (``encoder.layers``)."""
        return self.vit.encoder.layers

    def stem_parameters(self) -> list[nn.Parameter]:
        """The parameters before the first block: patch embedding, class token, position embedding."""
        return [*self.vit.conv_proj.parameters(), self.vit.class_token, self.vit.encoder.pos_embedding]

    def freeze_blocks(self, n: int) -> ViTBackbone:
        """Freeze the stem (patch embedding, class token, position embedding) and blocks ``0 .. n-1``;
        everything after (later blocks, final LayerNorm) stays trainable. ``n = 0`` freezes nothing."""
        if not 0 <= n <= len(self.blocks):
            raise ValueError(f"freeze_blocks: n must be in [0, {len(self.blocks)}] (the backbone has "
                             f"{len(self.blocks)} blocks), got {n}")
        for p in self.parameters():
            p.requires_grad_(True)
        if n > 0:
            for p in self.stem_parameters():
                p.requires_grad_(False)
            for block in list(self.blocks)[:n]:
                for p in block.parameters():
                    p.requires_grad_(False)
        self.frozen_blocks = n
        return self

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """[0, 1] images of any size -> ImageNet-normalised ``image_size`` inputs (the test-time transform)."""
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"ViTBackbone expects B × 3 × H × W images in [0, 1], got shape {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            if self.resize_to:
                images = center_crop(resize_shorter(images, int(self.resize_to)), self.image_size)
            else:
                images = resize(images, (self.image_size, self.image_size))
        return imagenet_normalize(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.vit._process_input(self.prepare(images))  # patch embedding: B × N × D
        x = torch.cat([self.vit.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.vit.encoder(x)  # position embedding, blocks, final LayerNorm
        return x[:, 0]


def _vit_config(arch: str, image_size: int, **sizes) -> dict:
    if arch not in ARCHS:
        raise ValueError(f"unknown backbone arch {arch!r}; known: {', '.join(ARCHS)}")
    defaults = VIT_B_16 if arch == "vit_b_16" else VIT_SMALL
    config = {"arch": arch, "image_size": int(image_size)}
    for key, default in defaults.items():
        value = sizes.get(key)
        config[key] = int(default if value is None else value)
    if arch == "vit_b_16":
        fixed = {k: config[k] for k in VIT_B_16 if config[k] != VIT_B_16[k]}
        if fixed:
            raise ValueError(f"vit_b_16 has fixed sizes {VIT_B_16}; got {fixed} (use arch=vit_small to size a ViT)")
    if config["image_size"] % config["patch_size"]:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {config['patch_size']}")
    return config


def _make_vit(config: Mapping[str, Any]) -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=config["image_size"], patch_size=config["patch_size"],
                             num_layers=config["num_layers"], num_heads=config["num_heads"],
                             hidden_dim=config["hidden_dim"], mlp_dim=config["mlp_dim"],
                             dropout=config.get("dropout", 0.0), attention_dropout=config.get("attention_dropout", 0.0))


def build_vit(
    arch: str = "vit_small",
    image_size: int = 32,
    pretrained: str | os.PathLike | None = None,
    *,
    patch_size: int | None = None,
    num_layers: int | None = None,
    num_heads: int | None = None,
    hidden_dim: int | None = None,
    mlp_dim: int | None = None,
    resize_to: int | None = None,
    dropout: float = 0.0,
    attention_dropout: float = 0.0,
) -> ViTBackbone:
    """A :class:`ViTBackbone` of ``arch`` at ``image_size``, with ``pretrained`` weights loaded strictly (or random).

    Sizes left ``None`` take the arch's defaults (:data:`VIT_B_16`, :data:`VIT_SMALL`). ``resize_to`` sets the
    test-time resize before the centre crop (None: resize straight to ``image_size``).
    """
    config = _vit_config(arch, image_size, patch_size=patch_size, num_layers=num_layers, num_heads=num_heads,
                         hidden_dim=hidden_dim, mlp_dim=mlp_dim)
    config.update(resize_to=None if resize_to is None else int(resize_to), dropout=float(dropout),
                  attention_dropout=float(attention_dropout))
    source = None if pretrained is None else backbone_weights(arch, str(pretrained))  # fail before building
    backbone = ViTBackbone(_make_vit(config), config)
    if source is not None:
        load_pretrained(backbone, source)
    return backbone


# ----------------------------------------------------------------------------------------------- loading and saving


def load_pretrained(backbone: ViTBackbone, pretrained: str | os.PathLike) -> ViTBackbone:
    """Load ``pretrained`` (a path, or a torchvision weights name for vit_b_16) into ``backbone``, strictly.

    A file saved by :func:`save_backbone` must have the same architecture (:data:`ARCH_KEYS`); any other file is
    read as a ``VisionTransformer`` state dict (with or without its ``heads``). Named torchvision weights trained at
    another resolution (SWAG E2E: 384 px) get their position embedding interpolated to ``image_size``.
    """
    arch = backbone.config["arch"]
    path = backbone_weights(arch, str(pretrained))
    if path.suffix == ".safetensors":
        state = load_weights_file(path)
    else:
        obj = load_torch_file(path, "backbone file")
        if isinstance(obj, Mapping) and obj.get("format") == BACKBONE_FORMAT:
            _check_same_arch(obj["config"], backbone.config, str(path))
            load_state_dict_strict(backbone, obj["state_dict"], str(path))
            backbone.info = dict(obj.get("info") or {})
            return backbone
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict or a backbone file")
        state = dict(obj["state_dict"] if isinstance(obj.get("state_dict"), Mapping) else obj)
    if any(k.startswith("heads.") for k in state):  # a full classifier's weights: the head is dropped
        state = {k: v for k, v in state.items() if not k.startswith("heads.")}
    named = arch == "vit_b_16" and not Path(str(pretrained)).expanduser().exists()
    own = backbone.vit.encoder.pos_embedding
    if named and "encoder.pos_embedding" in state and state["encoder.pos_embedding"].shape != own.shape:
        state = _interpolate_pos_embedding(state, backbone)
    load_state_dict_strict(backbone.vit, state, str(path))
    backbone.info = {"pretrained": str(pretrained)}
    return backbone


def _interpolate_pos_embedding(state: dict, backbone: ViTBackbone) -> dict:
    from torchvision.models.vision_transformer import interpolate_embeddings

    return dict(interpolate_embeddings(backbone.image_size, backbone.config["patch_size"], state))


def _check_same_arch(saved: Mapping, wanted: Mapping, source: str) -> None:
    diff = {k: (saved.get(k), wanted.get(k)) for k in ARCH_KEYS if saved.get(k) != wanted.get(k)}
    if diff:
        shown = ", ".join(f"{k}: file {a!r} vs config {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"backbone file {source} has another architecture than the config asks for ({shown})")


def save_backbone(backbone: ViTBackbone, path: str | os.PathLike, info: Mapping[str, Any] | None = None) -> Path:
    """Write ``backbone`` (architecture config, state dict, ``info``) to ``path`` atomically; return the path.

    ``info`` says what the weights were trained on (dataset, classes, stage ...); it must hold plain values
    (str, numbers, bool, None, lists and dicts of them) so that the file loads with ``weights_only=True``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    payload = {"format": BACKBONE_FORMAT, "config": dict(backbone.config), "state_dict": state,
               "info": dict(info or {})}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_backbone(path: str | os.PathLike) -> ViTBackbone:
    """Rebuild the backbone saved at ``path`` and load its weights strictly; its ``info`` is ``backbone.info``."""
    path = resolve(path)
    obj = load_torch_file(path, "backbone file")
    if not isinstance(obj, Mapping) or obj.get("format") != BACKBONE_FORMAT:
        raise ValueError(f"{path} is not a backbone file written by save_backbone (format {BACKBONE_FORMAT!r})")
    config = dict(obj["config"])
    sizes = {k: config.get(k) for k in ("patch_size", "num_layers", "num_heads", "hidden_dim", "mlp_dim",
                                         "resize_to", "dropout", "attention_dropout")}
    backbone = build_vit(config["arch"], config["image_size"], None, **sizes)
    load_state_dict_strict(backbone, obj["state_dict"], str(path))
    backbone.info = dict(obj.get("info") or {})
    return backbone


# ------------------------------------------------------------------------------------------------- feature extractor


class BackboneFeatures(nn.Module):
    """Feature extractor of ``detector=knn_backbone``: a backbone saved by the OE run (``<run>/backbone.pt``) or by
    the pretraining CLI; [0, 1] images -> CLS features after the final LayerNorm (B × D).

    ``checkpoint`` is the file or a run folder holding ``backbone.pt``. It is read on first use (or by
    :meth:`load`), so that a config naming a file that a previous run has not written yet still instantiates; the
    error then names the file. ``device``: ``"auto"`` (CUDA when available), or a torch device.
    """

    def __init__(self, checkpoint: str | os.PathLike | None, device: str = "auto") -> None:
        super().__init__()
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.device_name = device
        self.backbone: ViTBackbone | None = None

    def load(self) -> ViTBackbone:
        if self.backbone is None:
            if self.checkpoint is None:
                raise ValueError("BackboneFeatures needs a checkpoint: the backbone.pt of a train.py model=vit_oe run "
                                 "(detector.extractor.checkpoint=<run dir>/backbone.pt) or of the pretraining CLI")
            path = Path(self.checkpoint).expanduser()
            if path.is_dir():
                path = path / "backbone.pt"
            if not path.is_file():
                raise PretrainedNotFoundError(
                    f"backbone file {path} not found: train one with `python train.py model=vit_oe ...` (it writes "
                    "<run dir>/backbone.pt) or `python train.py model=backbone_pretrain datamodule=classification "
                    "...` (the same), and pass it as "
                    "detector.extractor.checkpoint")
            device = self.device_name
            if device == "auto":
                device = "cuda" if torch.cuda.is_available() else "cpu"
            self.backbone = load_backbone(path).to(device).eval()
            for p in self.backbone.parameters():
                p.requires_grad_(False)
        return self.backbone

    @property
    def feature_dim(self) -> int:
        return self.load().feature_dim

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        backbone = self.load()
        device = next(backbone.parameters()).device
        return backbone.eval()(images.to(device=device, dtype=torch.float32))


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "ARCHS",
    "BackboneFeatures",
    "ViTBackbone",
    "build_vit",
    "count_parameters",
    "load_backbone",
    "load_pretrained",
    "save_backbone",
]
