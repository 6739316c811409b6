"""Encoders: everything that turns [0, 1] images (B × 3 × H × W) into features (B × D).

- :mod:`~anomgen.encoders.raw`: the pixels themselves (:class:`RawPixels`, :func:`raw_pixels`) or averaged down
  (:class:`DownsampledPixels`);
- :mod:`~anomgen.encoders.handcrafted`: :class:`HOGFeatures`, :class:`RandomConvFeatures` (no trained weights);
- :mod:`~anomgen.encoders.torchvision_features`: :class:`TorchvisionFeatures` (ResNets and ViTs, head removed);
- :mod:`~anomgen.encoders.clip`: :class:`OpenCLIPImageEncoder` (CLIP, SigLIP image and text embeddings);
- :mod:`~anomgen.encoders.clip_text`: the CLIP text side shared with the text-to-image stack (offline
  ``CLIPTokenizer``, the SD 2.x text-encoder conversion, embedding injection, end-token pooling, concept files);
- :mod:`~anomgen.encoders.inception`: :class:`InceptionFeatures` (torch-fidelity's FID Inception-v3; its logits are
  the Inception Score's classifier);
- :mod:`~anomgen.encoders.lpips`: :class:`LPIPSDistance` (LPIPS between paired images, for IC-LPIPS; torchmetrics'
  or the ``lpips`` package's network with local backbone weights);
- :mod:`~anomgen.encoders.vit`: the FITYMI :class:`ViTBackbone` (:func:`build_vit`, save / load) and
  :class:`BackboneFeatures`, the feature extractor that reads a saved backbone;
- :mod:`~anomgen.encoders.base`: :func:`extract_features` runs any encoder over record batches.

Encoders build models; the weight files they load are found by :mod:`anomgen.pretrained`.
"""

from anomgen.encoders.base import extract_features
from anomgen.encoders.clip import OpenCLIPImageEncoder
from anomgen.encoders.handcrafted import HOGFeatures, RandomConvFeatures
from anomgen.encoders.inception import InceptionFeatures
from anomgen.encoders.lpips import LPIPSDistance
from anomgen.encoders.raw import DownsampledPixels, RawPixels, raw_pixels
from anomgen.encoders.torchvision_features import TorchvisionFeatures
from anomgen.encoders.vit import BackboneFeatures, ViTBackbone, build_vit, load_backbone, save_backbone

__all__ = [
    "BackboneFeatures",
    "DownsampledPixels",
    "HOGFeatures",
    "InceptionFeatures",
    "LPIPSDistance",
    "OpenCLIPImageEncoder",
    "RandomConvFeatures",
    "RawPixels",
    "TorchvisionFeatures",
    "ViTBackbone",
    "build_vit",
    "extract_features",
    "load_backbone",
    "raw_pixels",
    "save_backbone",
]
