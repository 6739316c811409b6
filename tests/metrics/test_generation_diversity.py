"""AnomalyDiffusion's generation metrics: Inception Score (against torchmetrics and by hand) and IC-LPIPS (by hand,
with stand-in distances), LPIPS from local backbone weights, and both over a synthetic set folder."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch import nn

from anomgen.errors import MetricError, PretrainedNotFoundError
from anomgen.metrics import InceptionScore, generation_metrics, ic_lpips, inception_score_from_logits


class LinearLogits(nn.Module):
    """A fixed random linear classifier of 3×8×8 images into 5 classes. uint8 input (what torchmetrics' IS passes
    on) is divided by 255; float input is first rounded down to 8 bits the way torchmetrics does, so both paths
    see the same pixels."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.proj = nn.Linear(3 * 8 * 8, 5)
        with torch.no_grad():
            self.proj.weight.copy_(torch.randn(5, 3 * 8 * 8, generator=gen) / 4)
            self.proj.bias.zero_()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            images = (images * 255).byte()
        return self.proj(images.float().div(255).flatten(1))


class MeanAbs(nn.Module):
    """A stand-in distance: mean |x − y| over the pixels of each pair."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - y).abs().flatten(1).mean(1)


def _flat(values) -> torch.Tensor:
    """Images 3×2×2 of one grey value each."""
    return torch.tensor(values, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(-1, 3, 2, 2).clone()


# -- Inception Score ------------------------------------------------------------------------------------------------


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def test_inception_score_by_hand_on_toy_logits():
    probs = [(0.5, 0.5), (0.9, 0.1), (0.1, 0.9), (0.5, 0.5)]
    logits = torch.tensor(probs, dtype=torch.float64).log()
    marginal = (0.5, 0.5)
    expected = math.exp(sum(_kl(p, marginal) for p in probs) / 4)
    assert inception_score_from_logits(logits, splits=1) == pytest.approx((expected, 0.0), rel=1e-12)
    # confident and evenly spread over C classes: IS = C; all alike: IS = 1
    assert inception_score_from_logits(torch.eye(4).repeat(3, 1) * 50, splits=1)[0] == pytest.approx(4.0, rel=1e-9)
    assert inception_score_from_logits(torch.ones(6, 3), splits=2) == pytest.approx((1.0, 0.0))
    # two splits: the seeded shuffle, then chunks; the std is the unbiased one over the two split scores
    gen = torch.Generator().manual_seed(3)
    toy = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(11)).tolist()
    scores = []
    for part in (perm[:3], perm[3:]):
        p = [toy[i].softmax(0).tolist() for i in part]
        m = [sum(col) / 3 for col in zip(*p)]
        scores.append(math.exp(sum(_kl(row, m) for row in p) / 3))
    mean = sum(scores) / 2
    std = math.sqrt(sum((s - mean) ** 2 for s in scores))  # / (2 - 1)
    assert inception_score_from_logits(toy, splits=2, seed=11) == pytest.approx((mean, std), rel=1e-9)
    with pytest.raises(MetricError, match="at least 2 samples"):
        inception_score_from_logits(toy, splits=4)


@pytest.mark.filterwarnings("ignore:Metric `InceptionScore` will save")
def test_inception_score_metric_equals_torchmetrics_with_the_same_classifier():
    from torchmetrics.image.inception import InceptionScore as TorchmetricsIS

    classifier = LinearLogits()
    images = torch.randint(0, 256, (40, 3, 8, 8), generator=torch.Generator().manual_seed(1)).float() / 255
    ours = InceptionScore(classifier, splits=4, seed=None)  # seed=None: torch's global generator, as torchmetrics
    theirs = TorchmetricsIS(feature=classifier, splits=4, normalize=True)
    for batch in images.split(16):
        ours.update(batch)
        theirs.update(batch)
    torch.manual_seed(123)
    expected = [float(v) for v in theirs.compute()]
    torch.manual_seed(123)
    got = [float(v) for v in ours.compute()]
    assert expected[0] > 1.05 and expected[1] > 0
    assert got == pytest.approx(expected, rel=1e-5)
    # seeded (the default): the same value every time, and that of the plain function on the logits
    seeded = InceptionScore(classifier, splits=4)
    seeded.update(images)
    with torch.no_grad():
        assert float(seeded.compute()[0]) == pytest.approx(inception_score_from_logits(classifier(images), 4)[0],
                                                           rel=1e-6)
    with pytest.raises(TypeError, match=r"InceptionFeatures\(feature='logits_unbiased'\)"):
        InceptionScore(None)


# -- IC-LPIPS --------------------------------------------------------------------------------------------------------


def test_ic_lpips_by_hand_with_a_known_distance():
    centres = _flat([0.0, 1.0, 5.0])
    generated = _flat([0.1, 0.9, 0.2, 0.7, 0.4, 0.65])
    result = ic_lpips(generated, centres, MeanAbs(), max_per_cluster=None)
    # nearest centre: 0.1, 0.2, 0.4 -> 0.0; 0.9, 0.7, 0.65 -> 1.0; none -> 5.0
    assert result.assignment.tolist() == [0, 1, 0, 1, 0, 1]
    assert result.sizes == [3, 3, 0]
    first = (0.1 + 0.3 + 0.2) / 3  # |0.1-0.2|, |0.1-0.4|, |0.2-0.4|
    second = (0.2 + 0.25 + 0.05) / 3  # |0.9-0.7|, |0.9-0.65|, |0.7-0.65|
    assert result.per_cluster[:2] == pytest.approx([first, second], abs=1e-6)
    assert math.isnan(result.per_cluster[2])  # no pair: left out of the mean
    assert result.value == pytest.approx((first + second) / 2, abs=1e-6)
    # a cluster of one image has no pair either
    lone = ic_lpips(_flat([0.1, 0.2, 0.9]), centres, MeanAbs())
    assert lone.sizes == [2, 1, 0] and lone.value == pytest.approx(0.1, abs=1e-6)
    with pytest.raises(MetricError, match="no cluster holds two"):
        ic_lpips(_flat([0.1, 0.9]), centres, MeanAbs())


def test_ic_lpips_equals_a_brute_force_loop_whatever_the_batch_size():
    gen = torch.Generator().manual_seed(2)
    generated, centres = torch.rand(13, 3, 4, 4, generator=gen), torch.rand(3, 3, 4, 4, generator=gen)
    distance = MeanAbs()
    d = lambda a, b: float(distance(a[None], b[None]))  # noqa: E731
    clusters = {c: [] for c in range(3)}
    for g in generated:
        clusters[min(range(3), key=lambda c: d(g, centres[c]))].append(g)
    means = [sum(d(a, b) for i, a in enumerate(m) for b in m[i + 1:]) / (len(m) * (len(m) - 1) / 2)
             for m in clusters.values() if len(m) >= 2]
    expected = sum(means) / len(means)
    for batch_size in (1, 5, 1000):
        assert ic_lpips(generated, centres, distance, None, batch_size=batch_size).value == pytest.approx(expected,
                                                                                                          rel=1e-9)
    # uint8 images are divided by 255
    as_bytes = (generated * 255).round().to(torch.uint8)
    assert ic_lpips(as_bytes, centres, distance, None).value == pytest.approx(
        ic_lpips(as_bytes.float() / 255, centres, distance, None).value, rel=1e-9)
    # a cap of 2 per cluster: each cluster's value is the distance of its 2 drawn members, the same for the same seed
    capped = ic_lpips(generated, centres, distance, max_per_cluster=2, seed=4)
    assert capped.value == ic_lpips(generated, centres, distance, max_per_cluster=2, seed=4).value
    assert capped.sizes == [len(m) for m in clusters.values()] and max(capped.sizes) > 2
    for members, value in zip(clusters.values(), capped.per_cluster):
        if len(members) >= 2:
            pairs = [d(a, b) for i, a in enumerate(members) for b in members[i + 1:]]
            assert min(abs(value - p) for p in pairs) < 1e-9  # one pair's distance


def test_missing_lpips_backbone_offline_is_one_error_naming_what_to_supply(tmp_path, monkeypatch):
    from anomgen.encoders import LPIPSDistance

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("ANOMGEN_PRETRAINED_DIR", raising=False)
    with pytest.raises(PretrainedNotFoundError) as err:
        LPIPSDistance(net="alex")
    message = str(err.value)
    assert "LPIPS (net='alex')" in message and "alexnet-owt-7be5be79.pth" in message
    assert "$ANOMGEN_PRETRAINED_DIR" in message and "LPIPSDistance(backbone=...)" in message
    assert "another distance module" in message


@pytest.fixture
def squeezenet_in_hub_cache(tmp_path, monkeypatch):
    """Random SqueezeNet 1.1 weights where torchvision keeps its ImageNet file (the real one needs a download)."""
    from torchvision.models import squeezenet1_1

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("ANOMGEN_PRETRAINED_DIR", raising=False)
    torch.manual_seed(0)
    checkpoints = tmp_path / "torch-home" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(squeezenet1_1(weights=None).state_dict(), checkpoints / "squeezenet1_1-b8a52dc0.pth")
    return checkpoints / "squeezenet1_1-b8a52dc0.pth"


def test_lpips_from_local_backbone_weights_equals_torchmetrics_lpips(squeezenet_in_hub_cache, one_thread):
    from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

    from anomgen.encoders import LPIPSDistance

    gen = torch.Generator().manual_seed(5)
    x, y = torch.rand(4, 3, 32, 32, generator=gen), torch.rand(4, 3, 32, 32, generator=gen)
    ours = LPIPSDistance(net="squeeze")  # found by name in the hub cache, loaded into the LPIPS trunk
    theirs = LearnedPerceptualImagePatchSimilarity(net_type="squeeze", reduction="none", normalize=True)
    torch.testing.assert_close(ours(x, y), theirs(x, y).reshape(4))
    assert torch.allclose(ours(x, x), torch.zeros(4), atol=1e-6)
    by_file = LPIPSDistance(net="squeeze", backbone=squeezenet_in_hub_cache)
    torch.testing.assert_close(by_file(x, y), ours(x, y))
    # either network serves IC-LPIPS, torchmetrics' metric object included
    generated, centres = torch.rand(6, 3, 32, 32, generator=gen), torch.rand(2, 3, 32, 32, generator=gen)
    assert ic_lpips(generated, centres, theirs).value == pytest.approx(ic_lpips(generated, centres, ours).value,
                                                                       rel=1e-5)
    if importlib.util.find_spec("lpips") is not None:  # the reference package is optional
        reference = LPIPSDistance(net="squeeze", backend="lpips")
        torch.testing.assert_close(reference(x, y), ours(x, y))


# -- over a synthetic set ------------------------------------------------------------------------------------------


def test_generation_metrics_over_a_set_folder(tmp_path):
    from anomgen.data.record import make_record
    from anomgen.data.synthetic import write_set

    gen = torch.Generator().manual_seed(9)
    images = torch.randint(0, 256, (10, 3, 8, 8), generator=gen).float() / 255
    types = ["crack"] * 6 + ["broken"] * 4
    samples = [{"image": images[i], "mask": torch.zeros(8, 8), "label": 1, "generator": "toy", "category": "bottle",
                "defect_type": types[i], "sources": [], "params": {}} for i in range(10)]
    samples.append({"image": torch.rand(3, 8, 8, generator=gen), "mask": None, "label": 0, "generator": "toy",
                    "category": "bottle", "defect_type": "good", "sources": [], "params": {}})  # not an anomaly
    set_dir = write_set(tmp_path / "set", samples, {"generator": "toy"})
    centres = torch.rand(4, 3, 16, 16, generator=gen)  # real anomalies at another size: resized to 8 px
    train = [make_record(centres[i], 1, None, f"real:{i}", None, "bottle", "real", t)
             for i, t in enumerate(["crack", "crack", "broken", "broken"])]
    classifier, distance = LinearLogits(), MeanAbs()
    out = generation_metrics(set_dir, train, classifier=classifier, distance=distance, splits=2, max_per_cluster=None)
    assert set(out) == {"num_generated", "inception_score", "inception_score_std", "ic_lpips", "ic_lpips/crack",
                        "ic_lpips/broken"}
    assert out["num_generated"] == 10
    with torch.no_grad():
        assert out["inception_score"] == pytest.approx(inception_score_from_logits(classifier(images), 2)[0],
                                                       rel=1e-5)
    from anomgen.pixels import resize

    small = (resize(centres, (8, 8)) * 255).round() / 255
    crack = ic_lpips(images[:6], small[:2], distance, None).value
    broken = ic_lpips(images[6:], small[2:], distance, None).value
    assert out["ic_lpips/crack"] == pytest.approx(crack, rel=1e-6)
    assert out["ic_lpips/broken"] == pytest.approx(broken, rel=1e-6)
    assert out["ic_lpips"] == pytest.approx((crack + broken) / 2, rel=1e-6)
    pooled = generation_metrics(set_dir, train, distance=distance, per_defect_type=False, max_per_cluster=None)
    assert set(pooled) == {"num_generated", "ic_lpips"}
    assert pooled["ic_lpips"] == pytest.approx(ic_lpips(images, small, distance, None).value, rel=1e-6)
    with pytest.raises(MetricError, match="'broken' has no training anomaly"):
        generation_metrics(set_dir, train[:2], distance=distance)
    with pytest.raises(ValueError, match="classifier"):
        generation_metrics(set_dir, train)
