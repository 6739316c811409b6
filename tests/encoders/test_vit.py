"""ViT backbones (anomgen.encoders.vit): features equal
torchvision's own computation, freezing is exact, backbone files reload strictly, missing weights fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from anomgen.detectors import KNNDetector
from anomgen.encoders import BackboneFeatures, ViTBackbone, build_vit
from anomgen.encoders.vit import load_backbone, load_pretrained, save_backbone
from anomgen.errors import PretrainedNotFoundError, UnsafeFileError
from anomgen.pixels import augment_batch, imagenet_normalize

ROOT = Path(__file__).resolve().parents[2]
TINY = {"patch_size": 4, "num_layers": 3, "num_heads": 2, "hidden_dim": 32, "mlp_dim": 64}


def _tiny(seed=0, image_size=16, **kw) -> ViTBackbone:
    torch.manual_seed(seed)
    return build_vit("vit_small", image_size, **{**TINY, **kw})


def _reference_cls(vit, x: torch.Tensor) -> torch.Tensor:
    """CLS token after the final LayerNorm, written out from torchvision's parts (patchify, class token, position
    embedding, blocks, LayerNorm)."""
    n = x.shape[0]
    tokens = vit.conv_proj(x)  # B × D × h × w
    tokens = tokens.flatten(2).transpose(1, 2)  # B × hw × D, row-major patches
    tokens = torch.cat([vit.class_token.expand(n, -1, -1), tokens], dim=1) + vit.encoder.pos_embedding
    for block in vit.encoder.layers:
        tokens = block(tokens)
    return vit.encoder.ln(tokens)[:, 0]


def test_features_equal_torchvision():
    backbone = _tiny().eval()
    images = torch.rand(5, 3, 16, 16)
    with torch.no_grad():
        feats = backbone(images)
        assert feats.shape == (5, backbone.feature_dim) == (5, 32)
        normed = imagenet_normalize(images)
        # torchvision's own forward (the head is an Identity in the backbone) ...
        torch.testing.assert_close(feats, backbone.vit(normed), rtol=0, atol=0)
        # ... and the computation written out from its parts
        torch.testing.assert_close(feats, _reference_cls(backbone.vit, normed), rtol=1e-5, atol=1e-5)
        # other sizes are resized to image_size first (8×8 digits, 28×28 silhouettes)
        assert backbone(torch.rand(2, 3, 8, 8)).shape == (2, 32)
        assert backbone(torch.rand(2, 3, 28, 28)).shape == (2, 32)


def test_resize_then_centre_crop_at_test_time():
    backbone = _tiny(image_size=16, resize_to=20).eval()
    images = torch.rand(2, 3, 40, 40)
    from anomgen.pixels import center_crop, resize

    expected = imagenet_normalize(center_crop(resize(images, (20, 20)), 16))
    torch.testing.assert_close(backbone.prepare(images), expected)
    with pytest.raises(ValueError, match="3 × H × W"):
        backbone(torch.rand(2, 1, 16, 16))


def test_freeze_blocks_freezes_exactly_the_stem_and_first_blocks():
    backbone = _tiny(num_layers=4).freeze_blocks(2)
    frozen = {name for name, p in backbone.named_parameters() if not p.requires_grad}
    expected = {"vit.class_token", "vit.encoder.pos_embedding", "vit.conv_proj.weight", "vit.conv_proj.bias"}
    first_two = ("vit.encoder.layers.encoder_layer_0.", "vit.encoder.layers.encoder_layer_1.")
    expected |= {name for name, _ in backbone.named_parameters() if name.startswith(first_two)}
    assert frozen == expected
    assert all(p.requires_grad for n, p in backbone.named_parameters() if "encoder_layer_2" in n or ".ln." in n)
    assert backbone.freeze_blocks(0) and all(p.requires_grad for p in backbone.parameters())
    with pytest.raises(ValueError, match="in \\[0, 4\\]"):
        backbone.freeze_blocks(5)


def test_augmentation_shapes_and_flip():
    images = torch.rand(6, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    assert augment_batch(images, 16, "pad_crop", padding=2, generator=g).shape == (6, 3, 16, 16)
    assert augment_batch(images, 16, "resize_crop", resize_to=20, generator=g).shape == (6, 3, 16, 16)
    out = augment_batch(images, 8, None, flip=True, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(o, i) or torch.equal(o, i.flip(-1)) for o, i in zip(out, images, strict=True))
    with pytest.raises(ValueError, match="augmentation kind"):
        augment_batch(images, 8, "mixup")


def test_saved_backbone_reloads_strictly_with_identical_features(tmp_path):
    backbone = _tiny(seed=3).eval()
    path = save_backbone(backbone, tmp_path / "b.pt", {"dataset": "digits", "classes": ["0", "1"]})
    again = load_backbone(path)
    images = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(backbone(images), again.eval()(images))
    assert again.info == {"dataset": "digits", "classes": ["0", "1"]} and again.config == backbone.config
    # as `pretrained` of build_vit, and through the detector-side extractor (file or run folder)
    with torch.no_grad():
        assert torch.equal(build_vit("vit_small", 16, path, **TINY).eval()(images), backbone(images))
        assert torch.equal(BackboneFeatures(path, device="cpu")(images), backbone(images))
    # strict: a missing key, an unexpected key, another architecture are errors
    payload = torch.load(path, weights_only=True)
    del payload["state_dict"]["vit.encoder.ln.bias"]
    torch.save(payload, tmp_path / "missing.pt")
    with pytest.raises(RuntimeError, match="missing keys: vit.encoder.ln.bias"):
        load_backbone(tmp_path / "missing.pt")
    payload = torch.load(path, weights_only=True)
    payload["state_dict"]["extra"] = torch.zeros(1)
    torch.save(payload, tmp_path / "extra.pt")
    with pytest.raises(RuntimeError, match="unexpected keys: extra"):
        load_backbone(tmp_path / "extra.pt")
    with pytest.raises(ValueError, match="num_layers: file 3 vs config 4"):
        build_vit("vit_small", 16, path, **{**TINY, "num_layers": 4})


def test_a_backbone_file_that_would_run_code_is_refused_without_running_it(tmp_path, code_running_file):
    """A backbone file is read with weights_only=True by every reader (load_backbone, load_pretrained through
    build_vit, BackboneFeatures): a crafted pickle is refused with an error naming the file, and its code never runs."""
    payload = torch.load(save_backbone(_tiny(), tmp_path / "good.pt"), weights_only=True)
    path = tmp_path / "backbone.pt"
    marker = code_running_file(path, lambda code: {**payload, "info": {"dataset": code}})
    readers = {"load_backbone": lambda: load_backbone(path),
               "build_vit": lambda: build_vit("vit_small", 16, path, **TINY),
               "BackboneFeatures": lambda: BackboneFeatures(str(path), device="cpu")(torch.rand(1, 3, 8, 8))}
    for name, read in readers.items():
        with pytest.raises(UnsafeFileError, match=r"backbone file .*backbone.pt was refused: .*mkdir"):
            read()
        assert not marker.exists(), f"{name} ran the file's code"


def test_backbone_features_in_a_knn_detector(tmp_path):
    path = save_backbone(_tiny(), tmp_path / "run" / "backbone.pt")
    extractor = BackboneFeatures(str(tmp_path / "run"), device="cpu")  # a run folder works too
    normals = [{"image": torch.rand(6, 3, 8, 8)}]
    detector = KNNDetector(extractor, k=2, distance="squared").fit(normals)
    scores = detector.score([{"image": normals[0]["image"][:2]}, {"image": torch.rand(3, 3, 8, 8)}])
    assert scores.shape == (5,) and path.is_file()
    with pytest.raises(PretrainedNotFoundError, match="no_such.pt"):
        BackboneFeatures(str(tmp_path / "no_such.pt"))(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="needs a checkpoint"):
        BackboneFeatures(None)(torch.rand(1, 3, 8, 8))


def test_missing_vit_b_16_weights_offline_name_the_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("ANOMGEN_PRETRAINED_DIR", raising=False)
    with pytest.raises(PretrainedNotFoundError, match="ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1") as err:
        build_vit("vit_b_16", 224, "IMAGENET1K_SWAG_E2E_V1")  # fails before building the 86M-parameter model
    assert "vit_b_16_swag-9ac1b537.pth" in str(err.value) and "download.pytorch.org" in str(err.value)
    # a small-ViT checkpoint path that does not exist says how to make it
    with pytest.raises(PretrainedNotFoundError, match="model=backbone_pretrain"):
        build_vit("vit_small", 16, str(tmp_path / "backbones" / "vit_small_digits.pt"), **TINY)


def test_plain_torchvision_state_dict_loads_strictly(tmp_path):
    from torchvision.models import VisionTransformer

    torch.manual_seed(1)
    vit = VisionTransformer(image_size=16, **TINY, num_classes=10)  # a classifier: its head is dropped on load
    torch.save(vit.state_dict(), tmp_path / "vit.pth")
    backbone = load_pretrained(_tiny(seed=2), tmp_path / "vit.pth").eval()
    vit.heads = torch.nn.Identity()
    images = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(backbone(images), vit.eval()(imagenet_normalize(images)))


def test_position_embedding_of_another_resolution_is_interpolated():
    """Named torchvision weights trained at another size (SWAG E2E: 384 px) are fitted to image_size."""
    from torchvision.models import VisionTransformer

    from anomgen.encoders.vit import _interpolate_pos_embedding
    from anomgen.pretrained import load_state_dict_strict

    state = VisionTransformer(image_size=24, **TINY).state_dict()
    state = {k: v for k, v in state.items() if not k.startswith("heads.")}
    backbone = _tiny(image_size=16)
    fitted = _interpolate_pos_embedding(state, backbone)
    assert fitted["encoder.pos_embedding"].shape == (1, 1 + 16, 32)
    load_state_dict_strict(backbone.vit, fitted, "interpolated")
