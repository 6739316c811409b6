"""Zero-shot CLIP detector: agrees with open_clip's own zero-shot computation, scores record batches, finds weights."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import Dataset

from anomgen.data.record import make_record
from anomgen.detectors.clip_zero_shot import CLIPZeroShot
from anomgen.encoders.clip import open_clip_architecture
from anomgen.errors import PretrainedNotFoundError
from anomgen.selection.evaluation import score_dataset

NORMAL, ANOMALOUS = "a photo of a cardinal.", "a photo of a some bird."




@pytest.fixture(scope="module")
def detector(tiny_clip_name):
    torch.manual_seed(0)
    return CLIPZeroShot(tiny_clip_name, pretrained=None)


class Records(Dataset):
    def __init__(self, images: torch.Tensor, labels: list[int]) -> None:
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return make_record(self.images[i], self.labels[i], None, f"img{i}", None, "cardinal", "real",
                           "good" if self.labels[i] == 0 else "other")


def open_clip_reference(model, tokenizer, images: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """Zero-shot probabilities written out with open_clip's own forward (normalised features, exp logit scale)."""
    mean = torch.tensor(model.visual.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.image_std).view(1, 3, 1, 1)
    with torch.no_grad():
        image_features, text_features, scale = model((images - mean) / std, tokenizer(texts))
    return (scale * image_features @ text_features.T).softmax(dim=-1)


def test_anomaly_scores_match_open_clip_zero_shot(detector, tiny_clip_name):
    import open_clip

    images = torch.rand(6, 3, 32, 32)
    expected = open_clip_reference(detector.model, open_clip.get_tokenizer(tiny_clip_name), images, [NORMAL, ANOMALOUS])
    scores = detector.anomaly_scores(detector.encode_images(images), NORMAL, ANOMALOUS)
    assert detector.logit_scale == pytest.approx(math.exp(detector.model.logit_scale.item()))
    assert scores.shape == (6,) and scores.dtype == torch.float64
    assert scores.std() > 1e-3 * scores.mean()  # the check below compares spread-out values, not a constant
    assert torch.allclose(scores.float(), expected[:, 1], rtol=1e-4, atol=1e-7)
    # text embeddings given instead of texts give the same scores
    text = detector.encode_texts([NORMAL, ANOMALOUS])
    assert torch.allclose(text.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(detector.anomaly_scores(detector.encode_images(images), text[0], text[1]), scores)
    # swapping the prompts gives the complementary probability
    swapped = detector.anomaly_scores(detector.encode_images(images), ANOMALOUS, NORMAL)
    assert torch.allclose(swapped, 1 - scores, atol=1e-12)


def test_text_embeddings_are_shared_with_the_asyrp_guide(detector, tiny_clip_name):
    """One text path for every open_clip user: the Asyrp CLIP guide with the same weights embeds texts identically,
    and a bare string or an empty list is refused (a string would be split into characters)."""
    from anomgen.generators.asyrp import OpenCLIPGuide

    guide = OpenCLIPGuide(tiny_clip_name, pretrained=None)
    guide.encoder.model.load_state_dict(detector.model.state_dict())
    texts = [NORMAL, ANOMALOUS, "a photo of a damaged cardinal."]
    torch.testing.assert_close(guide.encode_texts(texts), detector.encode_texts(texts))
    for bad in (NORMAL, []):
        with pytest.raises(ValueError, match="non-empty list of strings"):
            detector.encode_texts(bad)


def test_score_over_record_batches_via_score_dataset(detector, tiny_clip_name):
    torch.manual_seed(1)
    images = torch.rand(7, 3, 32, 32)
    labels = [0, 1, 0, 0, 1, 1, 0]
    det = CLIPZeroShot(tiny_clip_name, pretrained=None)
    det.model.load_state_dict(detector.model.state_dict())
    with pytest.raises(ValueError, match="no prompt pair"):
        det.score([{"image": images}])
    assert det.fit([]) is det
    det.set_prompts(NORMAL, ANOMALOUS)
    scores, got_labels, defects = score_dataset(det, Records(images, labels), batch_size=3)
    expected = detector.anomaly_scores(detector.encode_images(images), NORMAL, ANOMALOUS)
    assert torch.allclose(scores, expected, atol=1e-6)
    assert got_labels.tolist() == labels and defects[1] == "other"
    with pytest.raises(ValueError, match="both normal_text and anomalous_text"):
        CLIPZeroShot(tiny_clip_name, pretrained=None, normal_text=NORMAL)


def test_weights_file_gives_the_same_detector(detector, tiny_clip_name, tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(detector.model.state_dict(), path)
    loaded = CLIPZeroShot(tiny_clip_name, pretrained=str(path), normal_text=NORMAL, anomalous_text=ANOMALOUS)
    images = torch.rand(3, 3, 32, 32)
    assert torch.allclose(loaded.score([{"image": images}]),
                          detector.anomaly_scores(detector.encode_images(images), NORMAL, ANOMALOUS), atol=1e-6)


def test_openai_tags_get_the_quickgelu_architecture():
    assert open_clip_architecture("ViT-B-16", "openai") == "ViT-B-16-quickgelu"
    assert open_clip_architecture("ViT-B-16-quickgelu", "openai") == "ViT-B-16-quickgelu"
    assert open_clip_architecture("ViT-B-16", "laion2b_s34b_b88k") == "ViT-B-16"
    assert open_clip_architecture("ViT-B-16", None) == "ViT-B-16"


def test_missing_openai_weights_offline_name_the_hub_id(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(PretrainedNotFoundError, match="timm/vit_base_patch16_clip_224.openai"):
        CLIPZeroShot("ViT-B-16", pretrained="openai")
