"""Encoders of model selection (torchvision, HOG, downsampled and raw pixels, random CNN) against torchvision,
scikit-image and direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from anomgen.encoders.handcrafted import HOGFeatures, RandomConvFeatures
from anomgen.encoders.raw import DownsampledPixels, RawPixels, raw_pixels
from anomgen.encoders.torchvision_features import TorchvisionFeatures
from anomgen.errors import PretrainedNotFoundError
from anomgen.pixels import imagenet_normalize, resize

RESNET18_FILE = "resnet18-f37072fd.pth"  # the file name in torchvision's IMAGENET1K_V1 URL


def _resnet18_state(seed: int) -> dict:
    torch.manual_seed(seed)
    return torchvision.models.resnet18().state_dict()


def test_resnet18_random_weights_equal_torchvision_without_its_head():
    torch.manual_seed(0)
    extractor = TorchvisionFeatures("resnet18", pretrained=None, image_size=32)
    assert extractor.name == "resnet18-random-32"
    full = torchvision.models.resnet18().eval()  # the classifier, with its own (random) head
    full.load_state_dict({**extractor.model.state_dict(), "fc.weight": full.fc.weight, "fc.bias": full.fc.bias})
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        feats = extractor(images)
        assert feats.shape == (3, 512) and feats.dtype == torch.float32
        # the head applied to the features gives the classifier's logits: they are its penultimate features
        logits = full(imagenet_normalize(images))
        torch.testing.assert_close(feats @ full.fc.weight.T + full.fc.bias, logits, rtol=1e-4, atol=1e-4)
        # other sizes are resized to image_size first
        big = torch.rand(2, 3, 48, 40)
        torch.testing.assert_close(extractor(big), extractor(resize(big, (32, 32))))
    assert not any(p.requires_grad for p in extractor.parameters())


def test_vit_random_weights_equal_torchvision_cls_token():
    torch.manual_seed(0)
    extractor = TorchvisionFeatures("vit_b_32", pretrained=None, image_size=64)
    vit = extractor.model
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        feats = extractor(images)
        assert feats.shape == (2, 768)
        # the CLS token after the final LayerNorm, written out from torchvision's parts
        x = imagenet_normalize(images)
        tokens = vit.conv_proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([vit.class_token.expand(2, -1, -1), tokens], dim=1) + vit.encoder.pos_embedding
        for block in vit.encoder.layers:
            tokens = block(tokens)
        torch.testing.assert_close(feats, vit.encoder.ln(tokens)[:, 0], rtol=1e-4, atol=1e-4)
    assert isinstance(vit.heads, nn.Identity) and vit.image_size == 64
    assert (vit.patch_size, vit.hidden_dim, len(vit.encoder.layers)) == (32, 768, 12)  # torchvision's ViT-B/32


def test_local_weights_file_loads_strictly(tmp_path):
    state = _resnet18_state(seed=1)  # a whole classifier's weights (with fc)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    extractor = TorchvisionFeatures("resnet18", pretrained=str(path), image_size=32)
    own = extractor.model.state_dict()
    assert set(own) == {k for k in state if not k.startswith("fc.")}
    assert all(torch.equal(own[k], state[k]) for k in own)
    assert extractor.name == "resnet18-resnet18-32"

    torch.save({k: v for k, v in state.items() if k != "layer1.0.conv1.weight"}, path)
    with pytest.raises(RuntimeError, match="missing keys: layer1.0.conv1.weight"):
        TorchvisionFeatures("resnet18", pretrained=str(path), image_size=32)
    torch.save({**state, "extra.weight": torch.zeros(1)}, path)
    with pytest.raises(RuntimeError, match="unexpected keys: extra.weight"):
        TorchvisionFeatures("resnet18", pretrained=str(path), image_size=32)


def test_named_weights_are_found_offline_or_fail_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("ANOMGEN_PRETRAINED_DIR", raising=False)
    with pytest.raises(PretrainedNotFoundError, match=RESNET18_FILE):
        TorchvisionFeatures("resnet18", pretrained="IMAGENET1K_V1", image_size=32)
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):  # the error lists the arch's weights
        TorchvisionFeatures("resnet18", pretrained="IMAGENET9K", image_size=32)
    with pytest.raises(ValueError, match="IMAGENET1K_SWAG_LINEAR_V1"):  # ViT-H/14 has only SWAG weights
        TorchvisionFeatures("vit_h_14", pretrained="IMAGENET1K_V1")

    state = _resnet18_state(seed=2)
    (tmp_path / "weights").mkdir()
    torch.save(state, tmp_path / "weights" / RESNET18_FILE)
    monkeypatch.setenv("ANOMGEN_PRETRAINED_DIR", str(tmp_path / "weights"))
    extractor = TorchvisionFeatures("resnet18", pretrained="IMAGENET1K_V1", image_size=32)
    assert torch.equal(extractor.model.conv1.weight, state["conv1.weight"])
    assert extractor.name == "resnet18-IMAGENET1K_V1-32"


def test_torchvision_arguments_are_checked():
    with pytest.raises(ValueError, match="unknown torchvision arch 'resnet19'.*resnet18"):
        TorchvisionFeatures("resnet19", pretrained=None)
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        TorchvisionFeatures("vit_b_16", pretrained=None, image_size=40)


def test_hog_equals_scikit_image_on_the_grey_image():
    from skimage.feature import hog

    images = torch.rand(2, 3, 16, 16)
    extractor = HOGFeatures(image_size=None, orientations=6, pixels_per_cell=4, cells_per_block=2)
    feats = extractor(images)
    assert feats.shape == (2, 6 * 3 * 3 * 2 * 2)
    for feat, image in zip(feats, images, strict=True):
        expected = hog(image.mean(0).double().numpy(), orientations=6, pixels_per_cell=(4, 4),
                       cells_per_block=(2, 2), block_norm="L2-Hys")
        np.testing.assert_allclose(feat.numpy(), expected, rtol=1e-5, atol=1e-6)
    resized = HOGFeatures(image_size=32, pixels_per_cell=8)
    torch.testing.assert_close(resized(images), HOGFeatures(image_size=None, pixels_per_cell=8)(resize(images,
                                                                                                        (32, 32))))
    with pytest.raises(ValueError, match="fewer than cells_per_block"):
        HOGFeatures(image_size=8, pixels_per_cell=8, cells_per_block=2)
    with pytest.raises(ValueError, match="fewer than cells_per_block"):
        HOGFeatures(image_size=None, pixels_per_cell=8)(torch.rand(1, 3, 8, 8))


def test_downsampled_pixels_are_block_means():
    images = torch.rand(2, 3, 8, 8)
    block_means = images.reshape(2, 3, 4, 2, 4, 2).mean(dim=(3, 5))  # 2 × 2 blocks
    torch.testing.assert_close(DownsampledPixels(4)(images), block_means.flatten(1))
    torch.testing.assert_close(DownsampledPixels(4, grayscale=True)(images), block_means.mean(1).flatten(1))
    assert DownsampledPixels(1)(images).shape == (2, 3)
    assert DownsampledPixels(4).name == "pixels-4"
    with pytest.raises(ValueError, match="B × 3 × H × W"):
        DownsampledPixels(4)(torch.rand(2, 1, 8, 8))


def test_random_conv_features_are_fixed_by_seed_and_leave_the_global_rng_alone():
    images = torch.rand(4, 3, 16, 16)
    state = torch.get_rng_state()
    a, b, c = RandomConvFeatures(8, 3, seed=5), RandomConvFeatures(8, 3, seed=5), RandomConvFeatures(8, 3, seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    fa = a(images)
    assert fa.shape == (4, 8)
    assert torch.equal(fa, b(images))
    assert not torch.allclose(fa, c(images))
    # Kaiming-normal weights (fan-in 3·3·3, ReLU gain): std sqrt(2 / 27)
    wide = RandomConvFeatures(256, 1, seed=0)
    assert wide.body[0].weight.std().item() == pytest.approx((2 / 27) ** 0.5, rel=0.05)
    # the pooled output is the mean over space of ReLU(conv(ImageNet-normalised images))
    expected = F.relu(F.conv2d(imagenet_normalize(images), wide.body[0].weight, wide.body[0].bias, padding=1))
    torch.testing.assert_close(wide(images), expected.mean(dim=(2, 3)))


def test_raw_pixels_is_the_shared_module_with_a_name():
    module = raw_pixels(image_size=4, grayscale=False)
    assert isinstance(module, RawPixels) and module.name == "pixels-raw-4-rgb"
    images = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(module(images), RawPixels(image_size=4, grayscale=False)(images))
