"""WinCLIP / WinCLIP+ (anomgen.detectors.winclip): agrees with anomalib 2.7's WinClipModel on the same tiny open_clip
model and images (zero-shot and few-shot image scores and maps), and with independent computations of its parts."""

from __future__ import annotations

import inspect
import json
import statistics

import pytest
import torch

from anomgen.detectors.winclip import (
    WinCLIP,
    WinCLIPFeatures,
    association_scores,
    few_shot_patch_scores,
    harmonic_aggregation,
    prompt_ensemble,
    window_indices,
)

#: a tiny ViT with a real patch grid: 48 px, 8 px patches -> 6 × 6, so windows of 2 and 3 patches have room to slide;
#: the text context is 77 tokens because anomalib tokenizes with open_clip's default length
TINY_WINCLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 48, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
SIZE = 48
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def tiny_name(tmp_path_factory) -> str:
    import open_clip

    folder = tmp_path_factory.mktemp("winclip_cfg")
    (folder / "anomgen-test-winclip-48.json").write_text(json.dumps(TINY_WINCLIP))
    open_clip.add_model_config(folder)
    return "anomgen-test-winclip-48"


def _anomalib_model(name: str, class_name: str = "object"):
    """anomalib's WinClipModel on the tiny model: its module constants are read at construction."""
    import anomalib.models.image.winclip.torch_model as torch_model

    backbone, pretrained = torch_model.BACKBONE, torch_model.PRETRAINED
    torch_model.BACKBONE, torch_model.PRETRAINED = name, None
    try:
        return torch_model.WinClipModel(class_name=class_name).eval()
    finally:
        torch_model.BACKBONE, torch_model.PRETRAINED = backbone, pretrained


def _correct_window_transformer(oracle) -> None:
    """anomalib transposes the window tokens to sequence-first before the (batch-first, in open_clip ≥ 2.24)
    transformer. Marking the transformer sequence-first for that call makes its own transposes undo anomalib's, so
    the oracle computes what its code means; nothing else of anomalib's computation changes."""
    source = inspect.getsource(type(oracle)._get_window_embeddings)
    assert "permute(1, 0, 2)" in source and oracle.clip.visual.transformer.batch_first, \
        "anomalib's window embeddings changed: check whether the correction below is still needed"
    original = oracle._get_window_embeddings
    transformer = oracle.clip.visual.transformer

    def corrected(feature_map, masks):
        transformer.batch_first = False
        try:
            return original(feature_map, masks)
        finally:
            transformer.batch_first = True

    oracle._get_window_embeddings = corrected


@pytest.fixture(scope="module")
def pair(tiny_name):
    """(anomalib's model with corrected windows, our detector with the same weights)."""
    torch.manual_seed(0)
    oracle = _anomalib_model(tiny_name)
    _correct_window_transformer(oracle)
    detector = WinCLIP(class_name="object", model_name=tiny_name, pretrained=None, device="cpu")
    detector.encoder.model.load_state_dict(oracle.clip.state_dict(), strict=True)
    return oracle, detector


def _normalized(detector: WinCLIP, images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(detector.encoder.clip.mean).view(1, 3, 1, 1)
    std = torch.tensor(detector.encoder.clip.std).view(1, 3, 1, 1)
    return (images - mean) / std


def _images(n: int, seed: int) -> torch.Tensor:
    """[0, 1] images with some structure (smooth blobs + noise), so that embeddings differ between images."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 6, 6, generator=g)
    smooth = torch.nn.functional.interpolate(low, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    return (0.7 * smooth + 0.3 * torch.rand(n, 3, SIZE, SIZE, generator=g)).clamp(0, 1)


def _assert_close(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    theirs = theirs.double()
    assert ours.shape == theirs.shape, what
    assert theirs.std() > 100 * TOLERANCE, f"{what}: the oracle's values barely vary; the comparison would be weak"
    err = (ours.double() - theirs).abs().max().item()
    assert err < TOLERANCE, f"{what}: max |ours − anomalib| = {err:.2e}"


# ---------------------------------------------------------------------------------------------------- the parts


def test_prompt_ensemble_is_anomalibs():
    from anomalib.models.image.winclip.prompting import create_prompt_ensemble

    assert prompt_ensemble("screw") == create_prompt_ensemble("screw")
    normal, anomalous = prompt_ensemble("screw")
    assert len(normal) == 7 * 21 and len(anomalous) == 4 * 21
    assert "a photo of a flawless screw." in normal and "a photo of the screw with defect." in anomalous


@pytest.mark.parametrize("grid, size, stride", [((3, 3), 2, 1), ((4, 5), 2, 1), ((6, 6), 3, 1), ((5, 4), 2, 2),
                                                ((15, 15), 3, 1)])
def test_windows_are_anomalibs_masks(grid, size, stride):
    from anomalib.models.image.winclip.utils import make_masks

    windows = window_indices(grid, size, stride)
    assert torch.equal(windows, make_masks(grid, size, stride).T.long())
    # and each window is a square block of the row-major grid
    ids = torch.arange(grid[0] * grid[1]).view(grid)
    assert torch.equal(windows[0], ids[:size, :size].reshape(-1))
    with pytest.raises(ValueError, match="do not fit"):
        window_indices(grid, max(grid) + 1)


def test_harmonic_aggregation_against_a_direct_computation():
    grid = (4, 5)
    windows = window_indices(grid, 2)
    g = torch.Generator().manual_seed(3)
    scores = torch.rand(3, len(windows), generator=g, dtype=torch.float64) + 0.05
    scores[1, 4] = 0.0  # a zero score: the patches of that window get 0
    got = harmonic_aggregation(scores, windows, grid)
    assert got.shape == (3, *grid)
    for b in range(3):
        for p in range(grid[0] * grid[1]):
            covering = [scores[b, w].item() for w in range(len(windows)) if p in windows[w].tolist()]
            expected = 0.0 if 0.0 in covering else statistics.harmonic_mean(covering)
            assert got[b].reshape(-1)[p].item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # anomalib's own docstring example: a 3 × 3 grid, four 2 × 2 windows
    toy = harmonic_aggregation(torch.tensor([[1.0, 0.75, 0.5, 0.25]]), window_indices((3, 3), 2), (3, 3))
    assert torch.allclose(toy, torch.tensor([[[1.0, 6 / 7, 0.75], [2 / 3, 0.48, 0.375], [0.5, 1 / 3, 0.25]]]))


def test_association_score_is_half_the_smallest_cosine_distance():
    g = torch.Generator().manual_seed(1)
    queries, memory = torch.randn(2, 7, 5, generator=g), torch.randn(2, 9, 5, generator=g)
    got = association_scores(queries, memory, chunk=4)
    q = queries.double() / queries.double().norm(dim=-1, keepdim=True)
    m = memory.reshape(-1, 5).double() / memory.reshape(-1, 5).double().norm(dim=-1, keepdim=True)
    expected = torch.stack([torch.stack([min((1 - (qi @ mj)) / 2 for mj in m) for qi in qb]) for qb in q])
    assert got.shape == (2, 7) and torch.allclose(got, expected, atol=1e-12)
    assert torch.allclose(association_scores(memory[:1], memory), torch.zeros(1, 9, dtype=torch.float64), atol=1e-12)


def test_window_embedding_is_the_transformer_attending_within_the_window(pair):
    """A window's embedding = the class token when every token of {class, window} attends only to those tokens,
    the full sequence going through the transformer with an attention mask (the paper's wording)."""
    _, detector = pair
    encoder = detector.encoder
    visual = encoder.model.visual
    images = _images(2, seed=5)
    features = encoder(images)
    tokens = visual._embeds(encoder.preprocess(images))
    length = tokens.shape[1]
    for scale, windows, embeddings in zip(encoder.scales, encoder.windows, features.windows, strict=True):
        assert embeddings.shape == (2, (6 - scale + 1) ** 2, 16)
        for w in (0, len(windows) // 2, len(windows) - 1):
            keep = torch.cat([torch.tensor([0]), windows[w] + 1])
            mask = torch.zeros(length, length)
            blocked = torch.ones(length, dtype=torch.bool)
            blocked[keep] = False
            mask[keep.unsqueeze(1), torch.nonzero(blocked).view(1, -1)] = float("-inf")
            with torch.no_grad():
                out = visual.ln_post(visual.transformer(tokens, attn_mask=mask))[:, 0] @ visual.proj
            assert torch.allclose(embeddings[:, w], out, atol=1e-5), f"scale {scale}, window {w}"
    # windows see different patches, so their embeddings differ (anomalib's uncorrected windows are all equal)
    assert features.windows[0][0].std(dim=0).max() > 1e-3


def test_anomalib_window_embeddings_as_shipped_are_all_equal(tiny_name):
    """Why the oracle is corrected: as anomalib 2.7 ships it, with open_clip 3.3, attention runs across windows and
    every window of an image gets one embedding (anomalib issue #2571). When this fails, anomalib has changed:
    revisit _correct_window_transformer."""
    torch.manual_seed(0)
    oracle = _anomalib_model(tiny_name)
    with torch.no_grad():
        _, windows, _ = oracle.encode_image(torch.randn(2, 3, SIZE, SIZE))
    for embeddings in windows:
        assert (embeddings - embeddings[:, :1]).abs().max() < 1e-5


# ---------------------------------------------------------------------------------------------- against anomalib


def test_text_and_image_embeddings_are_anomalibs(pair):
    oracle, detector = pair
    images = _images(3, seed=7)
    assert torch.allclose(detector.text_embeddings("object"), oracle.text_embeddings, atol=1e-6)
    with torch.no_grad():
        image, windows, patches = oracle.encode_image(_normalized(detector, images))
    ours = detector.encoder(images)
    assert torch.allclose(ours.image, image, atol=1e-5) and torch.allclose(ours.patches, patches, atol=1e-5)
    for mine, theirs in zip(ours.windows, windows, strict=True):
        assert torch.allclose(mine, theirs, atol=1e-5)


def test_zero_shot_scores_and_maps_agree_with_anomalib(pair):
    oracle, detector = pair
    images = _images(6, seed=11)
    oracle.k_shot = 0
    with torch.no_grad():
        expected = oracle(_normalized(detector, images))
    assert detector.k_shot == 0
    scores, maps = detector.predict_images(images, "object")
    assert scores.dtype == torch.float64 and maps.shape == (6, SIZE, SIZE)
    _assert_close(scores, expected.pred_score, "zero-shot image scores")
    _assert_close(maps, expected.anomaly_map, "zero-shot maps")


@pytest.fixture(scope="module")
def few_shot_pair(tiny_name):
    """Both fitted on the same K = 3 normal images (ours in two record batches)."""
    torch.manual_seed(1)
    oracle = _anomalib_model(tiny_name)
    _correct_window_transformer(oracle)
    detector = WinCLIP(class_name="object", model_name=tiny_name, pretrained=None, device="cpu")
    detector.encoder.model.load_state_dict(oracle.clip.state_dict(), strict=True)
    references = _images(3, seed=13)
    oracle.setup(reference_images=_normalized(detector, references))
    detector.fit([{"image": references[:2]}, {"image": references[2:]}])
    return oracle, detector, references


def test_few_shot_scores_and_maps_agree_with_anomalib(few_shot_pair):
    oracle, detector, _ = few_shot_pair
    images = _images(6, seed=17)
    with torch.no_grad():
        expected = oracle(_normalized(detector, images))
    assert detector.k_shot == oracle.k_shot == 3
    scores, maps = detector.predict_images(images, "object")
    _assert_close(scores, expected.pred_score, "few-shot image scores")
    _assert_close(maps, expected.anomaly_map, "few-shot maps")
    # the few-shot part on its own: anomalib's _compute_few_shot_scores on its embeddings
    with torch.no_grad():
        _, windows, patches = oracle.encode_image(_normalized(detector, images))
        theirs = oracle._compute_few_shot_scores(patches, windows)
    encoder = detector.encoder
    ours = few_shot_patch_scores(encoder(images), detector.memory, encoder.windows, encoder.grid_size)
    _assert_close(ours, theirs, "few-shot patch maps")


def test_a_reference_image_scores_zero_against_itself(few_shot_pair):
    _, detector, references = few_shot_pair
    encoder = detector.encoder
    # embedded one at a time (other batches than the memory's): still zero at every patch
    features = WinCLIPFeatures.cat([encoder(references[i:i + 1]) for i in range(len(references))])
    maps = few_shot_patch_scores(features, detector.memory, encoder.windows, encoder.grid_size)
    assert maps.shape == (3, *encoder.grid_size)
    assert maps.abs().max() < 1e-6
    # so the image score of a reference is half its zero-shot score
    scores, _ = detector.predict_images(references, "object")
    memory, detector.memory = detector.memory, None
    try:
        zero_shot, _ = detector.predict_images(references, "object")
    finally:
        detector.memory = memory
    assert torch.allclose(scores, zero_shot / 2, atol=1e-6)
    # and another image does not score zero
    other = few_shot_patch_scores(encoder(_images(1, seed=99)), detector.memory, encoder.windows, encoder.grid_size)
    assert other.min() > 1e-4


# ---------------------------------------------------------------------------------------------- the detector


def _records(images: torch.Tensor, category: str) -> list[dict]:
    from torch.utils.data import DataLoader

    from anomgen.data.record import make_record

    records = [make_record(img, 0, None, f"img{i}", None, category, "real", "good") for i, img in enumerate(images)]
    return list(DataLoader(records, batch_size=2, shuffle=False))


def test_record_batches_scores_and_maps(tiny_name, tmp_path):
    torch.manual_seed(2)
    detector = WinCLIP(class_name=None, model_name=tiny_name, pretrained=None, scales=(2, 3), device="cpu")
    images = torch.nn.functional.interpolate(_images(5, seed=21), size=(40, 56), mode="bilinear").clamp(0, 1)
    batches = _records(images, "metal_nut")
    scores, maps = detector.predict(batches)
    assert scores.shape == (5,) and scores.dtype == torch.float64
    assert maps.shape == (5, 40, 56) and maps.dtype == torch.float32  # at the images' size, not the model's
    assert torch.equal(detector.score(batches), scores) and torch.equal(detector.score_maps(batches), maps)
    # the word is the records' category, underscores read as spaces
    assert list(detector._text) == ["metal nut"]
    assert torch.allclose(scores, detector.predict_images(images, "metal nut")[0])

    # zero-shot configuration: fitting keeps nothing
    detector.few_shot = False
    detector.fit(batches)
    assert detector.k_shot == 0
    # few-shot: the support batches are the memory
    detector.few_shot = True
    detector.fit(batches[:2])
    assert detector.k_shot == 4
    with pytest.raises(ValueError, match="no support images"):
        detector.fit([])

    # weights from a file go through the same path as every open_clip model (anomgen.pretrained.open_clip_weights)
    weights = tmp_path / "tiny_winclip.pt"
    torch.save(detector.encoder.model.state_dict(), weights)
    loaded = WinCLIP(class_name="metal nut", model_name=tiny_name, pretrained=str(weights), few_shot=False,
                     device="cpu")
    assert torch.allclose(loaded.score(batches), scores)
