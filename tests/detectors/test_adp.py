"""ADP's formulas (Eq. 1, 3–7) against independent computations in numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomgen.detectors import adp


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _fake_encoder(dim: int = 8, seed: int = 0):
    """A deterministic text 'encoder': every distinct prompt gets its own random (unnormalised) vector."""
    rng = np.random.default_rng(seed)
    table: dict[str, np.ndarray] = {}

    def encode(prompts):
        for p in prompts:
            table.setdefault(p, rng.normal(size=dim) * rng.uniform(0.5, 3.0))
        return torch.tensor(np.stack([table[p] for p in prompts]), dtype=torch.float32)

    return encode, table


def test_state_prompts_put_the_concept_in_each_state_and_template():
    prompts = adp.state_prompts("<c>", templates=("a photo of {}.", "a {} here"))
    assert prompts == [["a photo of flawless <c>.", "a flawless <c> here"],
                       ["a photo of damaged <c>.", "a damaged <c> here"]]


def test_p_clip_averages_text_embeddings_over_templates_before_the_softmax():
    encode, table = _fake_encoder()
    templates = ("a photo of {}.", "a close-up photo of {}.", "a dark photo of {}.")
    G = adp.averaged_state_embeddings(encode, "<c>", templates)
    images = np.random.default_rng(1).normal(size=(5, 8))
    tau = 0.07
    probs = adp.state_probabilities(torch.tensor(images, dtype=torch.float32), G, tau).numpy()

    # independent: G_s = mean_T unit(g(T(S_s))), then cosine, /tau, softmax over the two states
    g = [np.mean([_unit(table[t.format(s.format("<c>"))]) for t in templates], axis=0) for s in adp.STATES]
    logits = np.stack([_unit(images) @ _unit(gs) for gs in g], axis=1) / tau
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-6)

    # averaging the per-template probabilities instead is a different number
    per_template = []
    for t in templates:
        lt = np.stack([_unit(images) @ _unit(table[t.format(s.format("<c>"))]) for s in adp.STATES], axis=1) / tau
        e = np.exp(lt - lt.max(1, keepdims=True))
        per_template.append(e / e.sum(1, keepdims=True))
    assert np.abs(np.mean(per_template, axis=0) - expected).max() > 1e-3


def test_concept_weight_prototypes_and_the_adp_score():
    rng = np.random.default_rng(2)
    p_normals = torch.tensor(rng.dirichlet([1, 1], size=4), dtype=torch.float32)
    p_pseudo = torch.tensor(rng.dirichlet([1, 1], size=6), dtype=torch.float32)
    w = adp.concept_weight(p_normals, p_pseudo)
    assert float(w) == pytest.approx(p_normals[:, 0].mean().item() + p_pseudo[:, 1].mean().item(), abs=1e-6)

    G1, G2, G3 = (torch.tensor(rng.normal(size=(2, 8)), dtype=torch.float32) for _ in range(3))
    weights = [0.7, 1.3, 0.4]
    p = adp.prototypes([G1, G2, G3], weights).numpy()
    manual = (0.7 * G1.numpy() + 1.3 * G2.numpy() + 0.4 * G3.numpy()) / 2.4
    np.testing.assert_allclose(p, manual, rtol=1e-5, atol=1e-6)

    images = rng.normal(size=(3, 8))
    tau = 0.05
    adp_x = adp.normal_probability(torch.tensor(images, dtype=torch.float32), torch.tensor(p), tau).numpy()
    s_n, s_a = _unit(images) @ _unit(p[0]), _unit(images) @ _unit(p[1])
    np.testing.assert_allclose(adp_x, 1 / (1 + np.exp((s_a - s_n) / tau)), rtol=1e-5)
    # an image pointing at p_n is normal (ADP > 0.5, anomaly score 1 - ADP < 0.5), one at p_a anomalous
    both = adp.normal_probability(torch.tensor(p), torch.tensor(p), tau)
    assert both[0] > 0.5 > both[1]


def test_concept_losses_push_the_right_way():
    p = torch.tensor([[0.3, 0.7], [0.9, 0.1]], requires_grad=True)
    loss = adp.normal_concept_loss(p, alpha=2.0)
    assert loss.item() == pytest.approx(-2.0 * 0.6)
    loss.backward()
    assert (p.grad[:, 0] < 0).all()  # descending raises P(normal) of the normal shots
    q = torch.tensor([[0.3, 0.7], [0.9, 0.1]], requires_grad=True)
    loss = adp.anomaly_concept_loss(q, alpha=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(2.0 * (0.0 + 0.4) / 2)
    loss.backward()
    assert q.grad[0, 0] == 0 and q.grad[1, 0] > 0  # only pseudo-anomalies judged normal beyond gamma are pushed


def test_bad_shapes_and_weights_are_refused():
    with pytest.raises(ValueError, match="2 × D"):
        adp.state_probabilities(torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="one weight per concept"):
        adp.prototypes([torch.zeros(2, 4)], [1.0, 2.0])
    with pytest.raises(ValueError, match="positive sum"):
        adp.prototypes([torch.zeros(2, 4)], [0.0])
