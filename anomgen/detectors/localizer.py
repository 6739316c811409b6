"""The U-Net localizer: DRAEM's discriminative sub-network trained on image–mask pairs (AnomalyDiffusion's
localizer, METHODS.md §4), its loss, its scores and the detector that evaluate.py runs.

- :class:`DiscriminativeSubNetwork` ``(in 3, out 2, base_width 64)``: DRAEM's encoder of six blocks (two 3×3
  conv + BatchNorm + ReLU each, widths w, 2w, 4w, 8w, 8w, 8w, a 2×2 max-pool between blocks) and its decoder (five
  bilinear ×2 upsamplings, each a conv, then concatenation with the encoder block of that size and two convs), a
  final 3×3 conv to 2 logits per pixel (normal, anomalous). The module names are DRAEM's, so that a DRAEM or
  AnomalyDiffusion ``state_dict`` of that network loads strictly. Input: [0, 1] RGB (DRAEM feeds pixels / 255, no
  normalisation), height and width multiples of 32.
- :func:`focal_loss`: DRAEM's ``FocalLoss`` (γ = 2, α = 1, smooth 1e-5) on the softmax of the logits:
  the one-hot target is clamped to [smooth, 1 − smooth], p_t = Σ_c target_c · p_c + smooth, and the loss is the mean
  over pixels of −(1 − p_t)^γ · log p_t.
- :func:`anomaly_map` (p_anomalous, the softmax's second channel) and :func:`image_scores` (the maximum of
  ``avg_pool2d(p_anomalous, 21, stride 1, padding 10)``, padding counted as zeros, as DRAEM scores images).
- :func:`save_localizer` / :func:`load_localizer`: the weights file a training stage writes (architecture, state
  dict, what it was trained and selected on), loadable with ``weights_only=True``; a bare DRAEM-style state dict
  loads too.
- :class:`UNetLocalizer`: the detector (``fit`` only loads the weights; ``predict`` gives image scores and pixel
  maps p_anomalous at the images' size).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from anomgen.data.base import as_hw
from anomgen.detectors.maps import MapDetector
from anomgen.errors import PretrainedNotFoundError
from anomgen.pretrained import load_state_dict_strict, load_torch_file

#: the ``format`` tag of a weights file written by :func:`save_localizer`
LOCALIZER_FORMAT = "anomgen-unet-localizer-1"
#: the file name a training stage writes in its run folder (a folder given as a checkpoint is looked into for it)
WEIGHTS_NAME = "localizer.pt"
#: DRAEM's image score: the side of the average-pooling window over p_anomalous
SCORE_KERNEL = 21
#: the encoder's five 2×2 max-pools: input sides must be multiples of this
SIZE_MULTIPLE = 32


# --------------------------------------------------------------------------------------------------------- network


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, kernel_size=3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(*_conv_bn_relu(cin, cout), *_conv_bn_relu(cout, cout))


def _upsample_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True), *_conv_bn_relu(cin, cout))


class LocalizerEncoder(nn.Module):
    """DRAEM's ``EncoderDiscriminative``: six double-conv blocks ``block1`` .. ``block6`` (widths w, 2w, 4w, 8w, 8w,
    8w) with a 2×2 max-pool (``mp1`` .. ``mp5``) between them; returns the six blocks' activations."""

    def __init__(self, in_channels: int, base_width: int) -> None:
        super().__init__()
        widths = [base_width * m for m in (1, 2, 4, 8, 8, 8)]
        for i, (cin, cout) in enumerate(zip([in_channels, *widths[:-1]], widths), start=1):
            self.add_module(f"block{i}", _double_conv(cin, cout))
            if i < len(widths):
                self.add_module(f"mp{i}", nn.Sequential(nn.MaxPool2d(2)))

    def forward(self, x: Tensor) -> list[Tensor]:
        acts = []
        for i in range(1, 7):
            x = getattr(self, f"block{i}")(x)
            acts.append(x)
            if i < 6:
                x = getattr(self, f"mp{i}")(x)
        return acts


class LocalizerDecoder(nn.Module):
    """DRAEM's ``DecoderDiscriminative``: from the deepest activation up, each level upsamples ×2 and convolves
    (``up_b``, ``up1`` .. ``up4``), concatenates the encoder activation of that size (skip connection) and applies a
    double conv (``db_b``, ``db1`` .. ``db4``); ``fin_out`` maps w channels to ``out_channels`` logits."""

    #: (upsampling name, double-conv name, input width, output width, skip width) in multiples of base_width
    LEVELS = (("up_b", "db_b", 8, 8, 8), ("up1", "db1", 8, 4, 8), ("up2", "db2", 4, 2, 4),
              ("up3", "db3", 2, 1, 2), ("up4", "db4", 1, 1, 1))

    def __init__(self, base_width: int, out_channels: int) -> None:
        super().__init__()
        w = base_width
        for up, db, cin, cout, skip in self.LEVELS:
            self.add_module(up, _upsample_conv(cin * w, cout * w))
            self.add_module(db, _double_conv((cout + skip) * w, cout * w))
        self.fin_out = nn.Sequential(nn.Conv2d(w, out_channels, kernel_size=3, padding=1))

    def forward(self, acts: list[Tensor]) -> Tensor:
        x = acts[-1]
        for (up, db, *_), skip in zip(self.LEVELS, reversed(acts[:-1])):
            x = getattr(self, db)(torch.cat((getattr(self, up)(x), skip), dim=1))
        return self.fin_out(x)


class DiscriminativeSubNetwork(nn.Module):
    """DRAEM's discriminative sub-network, the localizer: [0, 1] images B × ``in_channels`` × H × W -> logits
    B × ``out_channels`` × H × W (channel 1: anomalous). H and W must be multiples of 32."""

    def __init__(self, in_channels: int = 3, out_channels: int = 2, base_width: int = 64) -> None:
        super().__init__()
        self.config = {"in_channels": int(in_channels), "out_channels": int(out_channels),
                       "base_width": int(base_width)}
        self.encoder_segment = LocalizerEncoder(in_channels, base_width)
        self.decoder_segment = LocalizerDecoder(base_width, out_channels)

    def forward(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
            raise ValueError(f"the localizer needs image sides that are multiples of {SIZE_MULTIPLE} (five 2×2 "
                             f"max-pools), got {height}×{width}; resize the images (e.g. 256 px)")
        return self.decoder_segment(self.encoder_segment(images))


# ----------------------------------------------------------------------------------------------- loss and scores


def focal_loss(logits: Tensor, masks: Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> Tensor:
    """DRAEM's focal loss on ``softmax(logits)`` (B × C × H × W) against ``masks`` (B × H × W or B × 1 × H × W,
    class index per pixel: 0 normal, 1 anomalous); the mean over every pixel."""
    if masks.dim() == logits.dim():
        masks = masks.squeeze(1)
    probs = logits.softmax(dim=1)
    num_classes = probs.shape[1]
    target = F.one_hot(masks.long(), num_classes).movedim(-1, 1).to(probs.dtype)
    if smooth:
        target = target.clamp(smooth / (num_classes - 1), 1.0 - smooth)
    pt = (target * probs).sum(dim=1) + smooth
    return (-((1.0 - pt) ** gamma) * pt.log()).mean()


def anomaly_map(logits: Tensor) -> Tensor:
    """p_anomalous (B × H × W, in [0, 1]): the softmax's anomalous channel."""
    return logits.softmax(dim=1)[:, 1]


def image_scores(maps: Tensor, kernel: int = SCORE_KERNEL) -> Tensor:
    """DRAEM's image score (B): the maximum of ``avg_pool2d(maps, kernel, stride 1, padding kernel // 2)`` over
    each map (B × H × W); the padding counts as zeros in the average."""
    pooled = F.avg_pool2d(maps.unsqueeze(1), kernel, stride=1, padding=kernel // 2)
    return pooled.flatten(1).amax(dim=1)


# --------------------------------------------------------------------------------------------------- weights file


def save_localizer(network: DiscriminativeSubNetwork, path: str | os.PathLike,
                   info: Mapping[str, Any] | None = None) -> Path:
    """Write ``network`` (architecture, state dict, ``info``: plain values) to ``path`` atomically; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}
    payload = {"format": LOCALIZER_FORMAT, "config": dict(network.config), "state_dict": state,
               "info": dict(info or {})}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_localizer(path: str | os.PathLike) -> tuple[DiscriminativeSubNetwork, dict]:
    """``(network, info)`` from a file of :func:`save_localizer`, or from a bare DRAEM-style state dict of the
    discriminative sub-network (its width read from the first conv); weights load strictly."""
    obj = load_torch_file(path, "localizer file")
    if isinstance(obj, Mapping) and obj.get("format") == LOCALIZER_FORMAT:
        network = DiscriminativeSubNetwork(**obj["config"])
        load_state_dict_strict(network, obj["state_dict"], str(path))
        return network, dict(obj.get("info") or {})
    first = "encoder_segment.block1.0.weight"
    if isinstance(obj, Mapping) and first in obj:
        out_channels = obj["decoder_segment.fin_out.0.weight"].shape[0]
        base_width, in_channels = obj[first].shape[:2]
        network = DiscriminativeSubNetwork(int(in_channels), int(out_channels), int(base_width))
        load_state_dict_strict(network, obj, str(path))
        return network, {"source": "state dict"}
    raise ValueError(f"{path} is neither a localizer file written by a model=unet_localizer stage (format "
                     f"{LOCALIZER_FORMAT!r}) nor a DRAEM-style state dict of the discriminative sub-network")


# ------------------------------------------------------------------------------------------------------- detector


class UNetLocalizer(MapDetector):
    """The trained localizer as a detector of evaluate.py; higher is more anomalous.

    ``checkpoint``: the ``localizer.pt`` a ``model=unet_localizer`` stage writes (its stage output ``checkpoint``),
    its run folder, or a DRAEM-style state dict; read on first use, so that a config naming a file that an earlier
    stage has not written yet still instantiates. :meth:`fit` only loads it (nothing is learned from the support
    set). :meth:`predict` gives the image scores (:func:`image_scores` of p_anomalous, ``score_kernel`` 21) and the
    pixel maps p_anomalous at the images' size. Images of another size than the one the localizer was trained at
    (``image_size`` in its file; ``image_size`` here overrides) are resized bilinearly for the network, the score is
    taken at the network's resolution and the maps are resized back.
    """

    #: p_anomalous and its window averages are probabilities: the ``score_range`` of binned pixel metrics
    map_range = (0.0, 1.0)

    def __init__(self, checkpoint: str | os.PathLike | None = None, device: str = "auto",
                 score_kernel: int = SCORE_KERNEL, image_size: int | list[int] | None = None,
                 name: str = "unet_localizer") -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.device = torch.device(device)
        self.score_kernel = int(score_kernel)
        self.image_size = None if image_size is None else as_hw(image_size)
        self.name = name
        self.network: DiscriminativeSubNetwork | None = None
        self.info: dict = {}

    def load(self) -> DiscriminativeSubNetwork:
        if self.network is None:
            if self.checkpoint is None:
                raise ValueError(f"{self.name} needs a checkpoint: the {WEIGHTS_NAME} of a `train.py "
                                 "model=unet_localizer` run (its run.json output `checkpoint`), e.g. "
                                 f"detector.checkpoint=<run dir>/{WEIGHTS_NAME}")
            path = Path(self.checkpoint).expanduser()
            if path.is_dir():
                path = path / WEIGHTS_NAME
            if not path.is_file():
                raise PretrainedNotFoundError(f"localizer weights {path} not found: train them with `python train.py "
                                              "experiment=localizer_mvtec ...` (stage localizer writes <stage dir>/"
                                              f"{WEIGHTS_NAME}) and pass that file as detector.checkpoint")
            network, self.info = load_localizer(path)
            self.network = network.to(self.device).eval()
            for p in self.network.parameters():
                p.requires_grad_(False)
            if self.image_size is None and self.info.get("image_size"):
                self.image_size = as_hw(self.info["image_size"])
        return self.network

    def fit(self, batches: Iterable[dict]) -> UNetLocalizer:
        """Load the weights; the support batches are not read (the localizer was trained by its own stage)."""
        self.load()
        return self

    @torch.no_grad()
    def predict_images(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """(image scores B float64, pixel maps B × H × W float32, CPU) of [0, 1] images B × 3 × H × W."""
        network = self.load()
        size = tuple(images.shape[-2:])
        inputs = images.to(self.device, torch.float32)
        if self.image_size is not None and size != self.image_size:
            inputs = F.interpolate(inputs, size=self.image_size, mode="bilinear", align_corners=False,
                                   antialias=True).clamp_(0.0, 1.0)
        maps = anomaly_map(network(inputs))
        scores = image_scores(maps, self.score_kernel)
        if tuple(maps.shape[-2:]) != size:
            maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0].clamp_(0, 1)
        return scores.double().cpu(), maps.float().cpu()

    def predict_batch(self, batch: dict) -> tuple[Tensor, Tensor]:
        """(image scores B, pixel maps p_anomalous B × H × W at the images' size) of one record batch."""
        return self.predict_images(batch["image"])

