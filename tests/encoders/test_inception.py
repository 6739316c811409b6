"""torch-fidelity's FID Inception-v3 as an encoder: its weights only from local files, found by
anomgen.pretrained.inception_weights; a clear error that says how to supply them or pass another encoder."""

from __future__ import annotations

import pytest
import torch

from anomgen.encoders import InceptionFeatures
from anomgen.errors import PretrainedNotFoundError
from anomgen.metrics import FID
from anomgen.pretrained import INCEPTION_WEIGHTS_FILE


@pytest.fixture
def no_local_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("ANOMGEN_PRETRAINED_DIR", raising=False)
    return tmp_path


def test_without_local_weights_says_how_to_supply_them_or_pass_another_extractor(no_local_weights):
    with pytest.raises(PretrainedNotFoundError) as err:
        InceptionFeatures()
    message = str(err.value)
    assert "Inception weights" in message and "unavailable offline" in message
    assert "feature_extractor=anomgen.encoders.RawPixels()" in message
    assert INCEPTION_WEIGHTS_FILE in message and "InceptionFeatures(weights=...)" in message
    with pytest.raises(PretrainedNotFoundError, match="unavailable offline"):
        InceptionFeatures(no_local_weights / "missing.pth")


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A weights file with torch-fidelity's Inception-v3 layout and random values (the real one needs a download)."""
    fidelity = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    from unittest import mock

    cls = fidelity.FeatureExtractorInceptionV3
    with mock.patch.object(fidelity, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(cls, "load_state_dict", lambda *a, **k: None):
        net = cls("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / INCEPTION_WEIGHTS_FILE
    torch.save(net.state_dict(), path)
    return path


def test_inception_features_from_local_weights(random_inception_weights, no_local_weights, monkeypatch):
    # found in $ANOMGEN_PRETRAINED_DIR without being named
    monkeypatch.setenv("ANOMGEN_PRETRAINED_DIR", str(random_inception_weights.parent))
    fid = FID(InceptionFeatures())
    extractor = fid.feature_extractor
    assert isinstance(extractor, InceptionFeatures) and fid.num_features == extractor.num_features == 2048
    grey = torch.rand(1, 1, 16, 16)
    feats = extractor(torch.cat([grey.expand(-1, 3, -1, -1), torch.rand(1, 3, 16, 16)]))
    assert feats.shape == (2, 2048)
    torch.testing.assert_close(extractor(grey), feats[:1])  # one grey channel is repeated to three
    extractor.train()
    assert not extractor.training


def test_inception_logits_are_the_inception_score_classifier(random_inception_weights, no_local_weights, one_thread):
    from anomgen.metrics import InceptionScore

    classifier = InceptionFeatures(random_inception_weights, feature="logits_unbiased")
    assert classifier.num_features == 1008
    score = InceptionScore(classifier, splits=1)
    score.update(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert score.logits[0].shape == (2, 1008)
    mean, std = score.compute()
    assert 1.0 <= float(mean) <= 2.0 and float(std) == 0.0
    with pytest.raises(ValueError, match="logits_unbiased"):
        InceptionFeatures(random_inception_weights, feature="pool")
