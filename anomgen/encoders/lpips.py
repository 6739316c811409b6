"""LPIPS (Zhang et al. 2018) as a distance module: ``LPIPSDistance()(x, y)`` -> B distances of paired [0, 1] images.

LPIPS is an ImageNet backbone (AlexNet, VGG-16 or SqueezeNet 1.1) whose unit-normalised activations are compared
through learned 1×1 linear layers. The linear layers ship inside both implementations offered here; the backbone's
ImageNet weights do not, and the implementations' own download is never used:

- ``backend="torchmetrics"``: the network of torchmetrics' ``LearnedPerceptualImagePatchSimilarity`` (its
  ``_NoTrainLpips``, a vendored copy of the reference code);
- ``backend="lpips"``: the reference ``lpips`` package (``pip install lpips``), ``version="0.1"``.

Either is built with a random backbone, then the backbone's torchvision weights are loaded into it from the file that
:func:`anomgen.pretrained.torchvision_weights` finds (``alexnet`` / ``vgg16`` / ``squeezenet1_1`` ``IMAGENET1K_V1`` in
the pretrained folder (``paths.pretrained_dir`` / ``$ANOMGEN_PRETRAINED_DIR``) or torch's hub cache, fetched into that
cache only when not offline; a file path; or
``None`` for a random backbone, which is not LPIPS: for tests only). Offline and missing, that is one
:class:`~anomgen.errors.PretrainedNotFoundError` naming the file, where to put it, and that any other distance module
can be given to the metric instead.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch
from torch import nn

from anomgen.errors import PretrainedNotFoundError
from anomgen.pretrained import load_state_dict_strict, load_weights_file, torchvision_weights

#: LPIPS network name -> the torchvision architecture of its backbone
LPIPS_BACKBONES = {"alex": "alexnet", "vgg": "vgg16", "squeeze": "squeezenet1_1"}
LPIPS_BACKENDS = ("torchmetrics", "lpips")


def _build(backend: str, net: str) -> nn.Module:
    """The LPIPS network of ``backend`` with its shipped linear layers and a random backbone (nothing downloaded)."""
    with warnings.catch_warnings():  # the lpips package passes torchvision's deprecated ``pretrained=`` argument
        warnings.simplefilter("ignore", UserWarning)
        if backend == "torchmetrics":
            from torchmetrics.functional.image.lpips import _NoTrainLpips

            return _NoTrainLpips(pretrained=True, net=net, pnet_rand=True)
        try:
            import lpips
        except ImportError:
            raise ModuleNotFoundError("LPIPSDistance(backend='lpips') needs the lpips package (`pip install lpips`); "
                                      "or use backend='torchmetrics' (the same network, shipped with torchmetrics)"
                                      ) from None
        return lpips.LPIPS(pretrained=True, net=net, version="0.1", pnet_rand=True, verbose=False)


def _numbered_layers(trunk: nn.Module) -> dict[int, nn.Module]:
    """The backbone layers of an LPIPS trunk by their index in torchvision's ``features`` (the slices keep those
    indices as their children's names, in both implementations)."""
    layers: dict[int, nn.Module] = {}
    for module in trunk.modules():
        if isinstance(module, nn.Sequential):
            for name, child in module.named_children():
                if name.isdigit():
                    layers[int(name)] = child
    return layers


def load_backbone_features(trunk: nn.Module, arch: str, file: str | os.PathLike) -> None:
    """Load torchvision ``arch`` weights from ``file`` (the whole classifier's state dict, or its ``features.*``
    part) into the LPIPS trunk ``trunk``; strict: every parameterised backbone layer of the trunk gets its weights."""
    from torchvision.models import get_model

    state = load_weights_file(file)
    model = get_model(arch, weights=None)
    if all(k.startswith("features.") for k in state):
        load_state_dict_strict(model.features, {k[len("features."):]: v for k, v in state.items()}, str(file))
    else:
        load_state_dict_strict(model, state, str(file))
    layers = _numbered_layers(trunk)
    features = model.features
    missing = [i for i, layer in enumerate(features) if any(True for _ in layer.parameters()) and i not in layers]
    if missing:
        raise RuntimeError(f"LPIPS trunk {type(trunk).__name__} has no layers {missing} of {arch}.features")
    with torch.no_grad():
        for i, layer in layers.items():
            layer.load_state_dict(features[i].state_dict(), strict=True)


class LPIPSDistance(nn.Module):
    """LPIPS between paired [0, 1] images: ``forward(x, y)`` (both B × 3 × H × W) -> B distances (float32).

    ``net``: ``"alex"`` (the usual choice, and the default), ``"vgg"`` or ``"squeeze"``; ``backend``:
    ``"torchmetrics"`` or ``"lpips"`` (see the module docstring); ``backbone``: the backbone's weights, a torchvision
    weights name (``"IMAGENET1K_V1"``, found by :func:`anomgen.pretrained.torchvision_weights`: in
    the pretrained folder or torch's hub cache), a weights file, or ``None`` (random: not LPIPS, for tests).
    The file is found before anything is built, so a missing one fails at once. Always in evaluation mode, no
    gradients.
    """

    def __init__(self, net: str = "alex", backend: str = "torchmetrics", backbone: str | os.PathLike | None =
                 "IMAGENET1K_V1") -> None:
        super().__init__()
        if net not in LPIPS_BACKBONES:
            raise ValueError(f"LPIPSDistance: net must be one of {tuple(LPIPS_BACKBONES)}, got {net!r}")
        if backend not in LPIPS_BACKENDS:
            raise ValueError(f"LPIPSDistance: backend must be one of {LPIPS_BACKENDS}, got {backend!r}")
        arch = LPIPS_BACKBONES[net]
        self.net_name, self.backend, self.arch = net, backend, arch
        file = None
        if backbone is not None:
            try:
                file = torchvision_weights(arch, backbone)
            except PretrainedNotFoundError as err:
                how = str(err).replace("as `pretrained`", "as LPIPSDistance(backbone=...)")
                raise PretrainedNotFoundError(
                    f"LPIPS (net={net!r}) needs its backbone's ImageNet weights ({arch}). {how} Or give the metric "
                    "another distance module (any nn.Module mapping two "
                    "B×3×H×W [0, 1] batches to B distances), e.g. anomgen.encoders.LPIPSDistance(backbone=None) for a "
                    "random-backbone stand-in in tests.") from None
        self.model = _build(backend, net)
        if file is not None:
            load_backbone_features(self.model.net, arch, file)
        self.backbone = None if backbone is None else str(backbone)
        self.name = f"lpips-{net}-{'random' if file is None else Path(str(backbone)).stem}"
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPSDistance:
        return super().train(False)  # a fixed distance: always in evaluation mode (dropout off)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for name, images in (("x", x), ("y", y)):
            if images.dim() != 4 or images.shape[1] != 3:
                raise ValueError(f"{self.name}: {name} must be B × 3 × H × W in [0, 1], got {tuple(images.shape)}")
        if x.shape != y.shape:
            raise ValueError(f"{self.name}: paired batches differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}")
        return self.model(x.float(), y.float(), normalize=True).reshape(x.shape[0]).float()


__all__ = ["LPIPS_BACKBONES", "LPIPS_BACKENDS", "LPIPSDistance", "load_backbone_features"]
