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


# -- the detector on a tiny open_clip model ----------------------------------------------------------------------------

def _tiny_clip_entry():
    from anomgen.encoders.clip_text import TINY_OPEN_CLIP_CONFIG, TINY_OPEN_CLIP_NAME

    return {"model_name": TINY_OPEN_CLIP_NAME, "pretrained": None, "config": dict(TINY_OPEN_CLIP_CONFIG)}


def _substituted_text_features(model, word_vectors: dict[str, torch.Tensor], prompts: list[str]) -> torch.Tensor:
    """Independent route: put each concept's vector in place of an existing word's row of a copy of the model's token
    table, then open_clip's own tokenizer and encode_text (argmax pooling is fine: no added ids)."""
    import copy

    import open_clip

    clone = copy.deepcopy(model)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    for word, vector in word_vectors.items():
        ids = tokenizer([word])[0]
        (row,) = ids[1:2].tolist()  # one BPE token
        with torch.no_grad():
            clone.token_embedding.weight[row] = vector
    return torch.nn.functional.normalize(clone.encode_text(tokenizer(prompts)).float(), dim=-1)


def test_concept_text_encoder_equals_open_clip_with_the_vector_in_the_table(tmp_path):
    from anomgen.encoders.clip_text import ConceptTextEncoder, load_open_clip

    model = load_open_clip(**_tiny_clip_entry())
    vector = torch.randn(32, generator=torch.Generator().manual_seed(0))
    encoder = ConceptTextEncoder(model, {"<c-n>": vector[None]})
    ours = encoder.encode(["a photo of flawless <c-n>.", "a dark photo of damaged <c-n>."])
    theirs = _substituted_text_features(model, {"zebra": vector}, ["a photo of flawless zebra.",
                                                                   "a dark photo of damaged zebra."])
    assert torch.allclose(ours, theirs, atol=1e-5)
    plain = encoder.encode(["a photo of flawless zebra."])
    assert (plain - ours[:1]).abs().max() > 1e-3  # the concept's vector is what differs

    with pytest.raises(ValueError, match=r"'object' is already a token"):
        ConceptTextEncoder(model, {"object": vector[None]})
    with pytest.raises(ValueError, match=r"shape \(1, 16\).*n × 32"):
        ConceptTextEncoder(model, {"<c-x>": torch.zeros(1, 16)})


def test_adp_detector_single_concept_is_p_clip_of_that_concept(tmp_path):
    """One concept, no patch score: the score is 1 − P_CLIP(S_n(c) | x) with template-averaged text embeddings,
    computed here through open_clip's own encode_text on a table holding the vector."""
    from anomgen.encoders.clip import embed_images
    from anomgen.encoders.clip_text import load_open_clip, save_concepts

    vector = torch.randn(32, generator=torch.Generator().manual_seed(1))
    path = save_concepts(tmp_path / "c.safetensors", {"<c-n>": vector[None]})
    templates = ("a photo of {}.", "a close-up photo of {}.")
    detector = adp.ADPDetector({"c_n": str(path)}, _tiny_clip_entry(), templates=templates, tau=0.05,
                               patch_weight=0.0, device="cpu")
    images = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    detector.fit([{"image": images[:2]}])
    scores = detector.score([{"image": images[:3]}, {"image": images[3:]}])

    model = load_open_clip(**_tiny_clip_entry())
    states = []
    for state in ("flawless zebra", "damaged zebra"):
        feats = _substituted_text_features(model, {"zebra": vector}, [t.format(state) for t in templates])
        states.append(feats.mean(0))
    with torch.no_grad():
        f = embed_images(model, images)
    cos = torch.stack([torch.nn.functional.cosine_similarity(f, s[None], dim=-1) for s in states], dim=1)
    expected = 1 - (cos / 0.05).softmax(dim=1)[:, 0]
    assert torch.allclose(scores.float(), expected, atol=1e-5)
    assert detector.weights == {"c_n": 1.0}


def test_adp_detector_weights_concepts_by_eq5_and_adds_the_patch_score(tmp_path):
    from anomgen.encoders.clip_text import save_concepts

    gen = torch.Generator().manual_seed(3)
    c_n = save_concepts(tmp_path / "cn.safetensors", {"<c-n>": torch.randn(2, 32, generator=gen)})
    c_a = save_concepts(tmp_path / "ca.safetensors", {"<c-a>": torch.randn(1, 32, generator=gen)})
    pseudo_images = torch.rand(3, 3, 32, 32, generator=gen)
    pseudo_dir = tmp_path / "pseudo"
    _write_set(pseudo_dir, pseudo_images)
    shots = torch.rand(2, 3, 32, 32, generator=gen)
    queries = torch.rand(4, 3, 32, 32, generator=gen)
    entry = _tiny_clip_entry()
    winclip = {"model_name": "anomgen-tiny-winclip", "pretrained": None,
               "config": {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                                         "head_width": 16},
                          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                                       "layers": 1}}}
    torch.manual_seed(0)
    detector = adp.ADPDetector({"c_n": str(c_n), "c_a": str(c_a)}, entry, pseudo_anomalies=str(pseudo_dir),
                               label_word="metal_nut", tau=0.05, patch_weight=0.3, patch_clip=winclip, device="cpu")
    detector.fit([{"image": shots}])
    scores = detector.score([{"image": queries}])

    # Eq. 5 and 6 recomputed from the detector's own text embeddings and CLIP image features
    states = detector.state_embeddings()
    assert set(states) == {"c_n", "c_a", "label"} and detector.placeholders["label"] == "metal nut"
    pseudo = detector.image_features(_read_set_images(pseudo_dir))
    f_shots = detector.image_features(shots)
    for name, g in states.items():
        p_shots = adp.state_probabilities(f_shots, g, 0.05)
        p_pseudo = adp.state_probabilities(pseudo, g, 0.05)
        assert detector.weights[name] == pytest.approx(float(p_shots[:, 0].mean() + p_pseudo[:, 1].mean()), abs=1e-5)
    w = torch.tensor([detector.weights[n] for n in states])
    p = sum(wi * g for wi, g in zip(w, states.values())) / w.sum()
    adp_score = 1 - adp.state_probabilities(detector.image_features(queries), p, 0.05)[:, 0].double()
    from anomgen.detectors.winclip import few_shot_patch_scores

    patch = few_shot_patch_scores(detector.patch(queries), detector.patch(shots), detector.patch.windows,
                                  detector.patch.grid_size).amax(dim=(-2, -1))
    assert torch.allclose(scores, 0.7 * adp_score + 0.3 * patch.double(), atol=1e-5)
    # a shot itself has patch score 0: its score is 0.7 × (1 − ADP)
    own = detector.score([{"image": shots[:1]}])
    assert float(own[0]) == pytest.approx(0.7 * (1 - float(adp.state_probabilities(f_shots[:1], p, 0.05)[0, 0])),
                                          abs=1e-5)


def test_adp_detector_refuses_what_it_cannot_use(tmp_path):
    from anomgen.encoders.clip_text import save_concepts

    wide = save_concepts(tmp_path / "wide.safetensors", {"<c-w>": torch.zeros(1, 1024)})
    with pytest.raises(ValueError, match=r"wide\.safetensors.*1024.*32"):
        adp.ADPDetector({"c": str(wide)}, _tiny_clip_entry(), patch_weight=0.0, device="cpu")
    ok = save_concepts(tmp_path / "ok.safetensors", {"<c-o>": torch.zeros(1, 32)})
    with pytest.raises(ValueError, match="needs pseudo_anomalies"):
        adp.ADPDetector({"c": str(ok)}, _tiny_clip_entry(), label_word="bottle", patch_weight=0.0, device="cpu")
    with pytest.raises(ValueError, match="call fit"):
        adp.ADPDetector({"c": str(ok)}, _tiny_clip_entry(), patch_weight=0.0, device="cpu").score(
            [{"image": torch.rand(1, 3, 32, 32)}])


def _write_set(folder, images):
    from anomgen.data.generation import GeneratedBatch
    from anomgen.data.synthetic import write_set

    n = len(images)
    write_set(folder, GeneratedBatch(index=torch.arange(n), image=images, mask=None,
                                     label=torch.ones(n, dtype=torch.long), generator="sdedit", category=["x"] * n,
                                     defect_type=["sdedit"] * n, sources=[[f"/s/{i}.png"] for i in range(n)],
                                     params=[{}] * n), {"generator": "sdedit"})


def _read_set_images(folder):
    from anomgen.data.synthetic import SyntheticSet

    s = SyntheticSet(folder, image_size=(32, 32), labels=(1,))
    return torch.stack([s[i]["image"] for i in range(len(s))])
