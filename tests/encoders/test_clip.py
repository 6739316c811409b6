"""The open_clip image encoder: agrees with open_clip's own encode_image, loads weights strictly, fails fast offline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from anomgen.encoders import OpenCLIPImageEncoder
from anomgen.errors import PretrainedNotFoundError


def test_features_match_open_clip_encode_image(tiny_clip_name):
    torch.manual_seed(0)
    encoder = OpenCLIPImageEncoder(tiny_clip_name, pretrained=None)
    images = torch.rand(3, 3, 32, 32)
    mean = torch.tensor(encoder.model.visual.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(encoder.model.visual.image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = F.normalize(encoder.model.encode_image((images - mean) / std), dim=-1)
    features = encoder(images)
    assert features.shape == (3, 16)
    assert torch.allclose(features, expected, atol=1e-6)
    assert torch.allclose(features.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert encoder(torch.rand(2, 3, 40, 48)).shape == (2, 16)  # other sizes are resized to the model's


def test_weights_file_loads_strictly(tiny_clip_name, tmp_path):
    torch.manual_seed(1)
    source = OpenCLIPImageEncoder(tiny_clip_name, pretrained=None)
    path = tmp_path / "weights.pt"
    torch.save(source.model.state_dict(), path)
    loaded = OpenCLIPImageEncoder(tiny_clip_name, pretrained=str(path))
    images = torch.rand(2, 3, 32, 32)
    assert torch.allclose(loaded(images), source(images), atol=1e-6)
    state = source.model.state_dict()
    state["unexpected.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match="unexpected"):
        OpenCLIPImageEncoder(tiny_clip_name, pretrained=str(tmp_path / "bad.pt"))


def test_missing_weights_offline_name_the_hub_id(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(PretrainedNotFoundError, match="timm/ViT-B-16-SigLIP"):
        OpenCLIPImageEncoder("ViT-B-16-SigLIP", pretrained="webli")


def test_unknown_tag_lists_the_valid_ones():
    with pytest.raises(ValueError, match="webli"):
        OpenCLIPImageEncoder("ViT-B-16-SigLIP", pretrained="no-such-tag")
