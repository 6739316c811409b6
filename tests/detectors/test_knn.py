"""kNN scoring (anomgen.detectors.knn), the raw-pixel features and the KNNDetector wrapper, against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from anomgen.detectors import KNNDetector, KNNScorer
from anomgen.encoders import RawPixels


def _brute(bank: np.ndarray, queries: np.ndarray, k: int, distance: str) -> np.ndarray:
    """Sum of the k smallest squared / plain L2 distances, in float64, by explicit pairwise differences."""
    bank = bank.astype(np.float64)
    queries = queries.astype(np.float64)
    d2 = ((queries[:, None, :] - bank[None, :, :]) ** 2).sum(-1)
    smallest = np.sort(d2, axis=1)[:, :k]
    return smallest.sum(1) if distance == "squared" else np.sqrt(smallest).sum(1)


def _data(n_bank=57, n_query=23, dim=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n_bank, dim)).astype(np.float32), rng.normal(size=(n_query, dim)).astype(np.float32)


CHUNKS = [
    {},  # defaults: everything in one chunk
    {"query_chunk": 5, "bank_chunk": 7},  # chunks smaller than the data, not dividing it
    {"query_chunk": 1, "bank_chunk": 1},  # bank_chunk < k
    {"query_chunk": 4, "bank_chunk": 2},  # bank_chunk < k = 3
]


@pytest.mark.parametrize("chunks", CHUNKS)
@pytest.mark.parametrize("k, distance", [(2, "squared"), (3, "euclidean"), (1, "squared"), (5, "euclidean")])
def test_scores_equal_brute_force(k, distance, chunks):
    bank, queries = _data()
    scorer = KNNScorer(k=k, distance=distance, **chunks).fit(torch.from_numpy(bank))
    got = scorer.score(torch.from_numpy(queries)).numpy()
    assert got.shape == (len(queries),)
    np.testing.assert_allclose(got, _brute(bank, queries, k, distance), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("chunks", CHUNKS)
def test_kneighbors_are_the_k_smallest_squared_distances_ascending(chunks):
    bank, queries = _data(seed=1)
    k = 4
    d2 = KNNScorer(k=k, **chunks).fit(bank).kneighbors(queries).numpy()
    assert d2.shape == (len(queries), k)
    assert (np.diff(d2, axis=1) >= 0).all()
    expected = np.sort(((queries[:, None, :].astype(np.float64) - bank[None]) ** 2).sum(-1), axis=1)[:, :k]
    np.testing.assert_allclose(d2, expected, rtol=1e-4, atol=1e-4)


def test_matches_sklearn_nearest_neighbors():
    from sklearn.neighbors import NearestNeighbors

    bank, queries = _data(n_bank=40, n_query=15, dim=4, seed=2)
    dist, _ = NearestNeighbors(n_neighbors=3).fit(bank).kneighbors(queries)
    got = KNNScorer(k=3, distance="euclidean", query_chunk=4, bank_chunk=6).fit(bank).score(queries).numpy()
    np.testing.assert_allclose(got, dist.sum(1), rtol=1e-4, atol=1e-4)


def test_query_in_bank_scores_near_zero_with_k1_and_duplicates_count_twice():
    bank, _ = _data(n_bank=10, dim=3, seed=3)
    scorer = KNNScorer(k=1, distance="squared", bank_chunk=3).fit(bank)
    np.testing.assert_allclose(scorer.score(bank).numpy(), 0.0, atol=1e-5)
    # a duplicated bank point is two neighbours at distance 0
    doubled = np.concatenate([bank, bank[:1]])
    s = KNNScorer(k=2, distance="squared", bank_chunk=4).fit(doubled).score(bank[:1]).numpy()
    np.testing.assert_allclose(s, 0.0, atol=1e-5)


def test_higher_score_for_farther_points():
    bank = torch.zeros(5, 2)
    scorer = KNNScorer(k=2, distance="euclidean").fit(bank)
    s = scorer.score(torch.tensor([[0.0, 1.0], [0.0, 3.0], [4.0, 0.0]]))
    torch.testing.assert_close(s, torch.tensor([2.0, 6.0, 8.0]))


def test_bank_equal_to_k_and_whole_bank_used():
    bank = torch.tensor([[0.0], [1.0], [5.0]])
    s = KNNScorer(k=3, distance="squared", bank_chunk=2).fit(bank).score(torch.tensor([[2.0]]))
    torch.testing.assert_close(s, torch.tensor([4.0 + 1.0 + 9.0]))


def test_no_queries_give_no_scores():
    scorer = KNNScorer(k=2, query_chunk=3).fit(torch.rand(5, 4))
    assert scorer.score(torch.zeros(0, 4)).shape == (0,)
    assert scorer.kneighbors(torch.zeros(0, 4)).shape == (0, 2)


def test_accepts_numpy_and_double():
    bank, queries = _data(seed=4)
    a = KNNScorer(k=2).fit(bank.astype(np.float64)).score(queries.astype(np.float64))
    b = KNNScorer(k=2).fit(torch.from_numpy(bank)).score(torch.from_numpy(queries))
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b)


# -------------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("k", [0, -1])
def test_k_must_be_positive(k):
    with pytest.raises(ValueError, match=f"k must be >= 1, got {k}"):
        KNNScorer(k=k)


def test_unknown_distance():
    with pytest.raises(ValueError, match="distance must be one of .*'cosine'"):
        KNNScorer(distance="cosine")


def test_bank_smaller_than_k():
    with pytest.raises(ValueError, match="2 features, fewer than k = 3"):
        KNNScorer(k=3).fit(torch.zeros(2, 4))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_bank(bad):
    bank = torch.zeros(4, 3)
    bank[2, 1] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        KNNScorer(k=2).fit(bank)


def test_bank_must_be_2d():
    with pytest.raises(ValueError, match=r"N × D, got shape \(4,\)"):
        KNNScorer(k=2).fit(torch.zeros(4))


def test_query_dimension_mismatch():
    scorer = KNNScorer(k=2).fit(torch.zeros(4, 3))
    with pytest.raises(ValueError, match=r"queries must be M × 3, got shape \(2, 5\)"):
        scorer.score(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="queries must be M × 3"):
        scorer.score(torch.zeros(3))


def test_score_before_fit():
    with pytest.raises(RuntimeError, match="fit"):
        KNNScorer().score(torch.zeros(1, 2))


# ------------------------------------------------------------------------------------------------------ features


def test_raw_pixels_grey_shape_and_value():
    x = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    f = RawPixels()(x)
    assert f.shape == (4, 64)
    torch.testing.assert_close(f, ((x[:, 0] + x[:, 1] + x[:, 2]) / 3).reshape(4, 64))


def test_raw_pixels_rgb_is_the_flattened_image():
    x = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    f = RawPixels(grayscale=False)(x)
    assert f.shape == (2, 75)
    assert torch.equal(f, x.reshape(2, -1))


@pytest.mark.parametrize("grayscale, channels", [(True, 1), (False, 3)])
def test_raw_pixels_resize(grayscale, channels):
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    f = RawPixels(image_size=8, grayscale=grayscale)(x)
    assert f.shape == (3, channels * 64)
    # a 2x antialiased bilinear downsample of a constant image keeps the constant; of any image keeps the mean
    const = torch.full((1, 3, 16, 16), 0.25)
    torch.testing.assert_close(RawPixels(image_size=8, grayscale=grayscale)(const),
                               torch.full((1, channels * 64), 0.25))
    ref = F.interpolate(x, size=(8, 8), mode="bilinear", antialias=True, align_corners=False)
    ref = ref.mean(1, keepdim=True) if grayscale else ref
    torch.testing.assert_close(f, ref.flatten(1))
    # a symmetric resampling filter keeps a linear ramp linear away from the border: output pixel j of a 2x
    # downsample sits at input coordinate 2j + 0.5 (pixel centres)
    ramp = torch.arange(16.0).div(16.0).expand(1, 3, 16, 16)
    out = RawPixels(image_size=8, grayscale=grayscale)(ramp).reshape(channels, 8, 8)
    expected = (2 * torch.arange(8.0) + 0.5) / 16.0
    torch.testing.assert_close(out[:, :, 1:-1], expected[1:-1].expand(channels, 8, 6))


@pytest.mark.parametrize("height, width", [(16, 8), (8, 16), (5, 8)])
def test_raw_pixels_non_square_input_is_resized_to_the_square(height, width):
    """Features of any input have the same length: a non-square image whose width already matches is resized too."""
    x = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(3))
    f = RawPixels(image_size=8)(x)
    assert f.shape == (2, 64)
    ref = F.interpolate(x, size=(8, 8), mode="bilinear", antialias=True, align_corners=False).mean(1)
    torch.testing.assert_close(f, ref.flatten(1))


def test_raw_pixels_same_size_is_no_resize():
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(RawPixels(image_size=8, grayscale=False)(x), x.flatten(1))


# ------------------------------------------------------------------------------------------------------ detector


def _batches(images: torch.Tensor, size: int) -> list[dict]:
    return [{"image": images[i : i + size], "label": torch.zeros(len(images[i : i + size]))}
            for i in range(0, len(images), size)]  # fmt: skip


@pytest.mark.parametrize("k, distance", [(2, "squared"), (3, "euclidean")])
def test_knn_detector_equals_scorer_on_flattened_images(k, distance):
    gen = torch.Generator().manual_seed(5)
    normals = torch.rand(20, 3, 6, 6, generator=gen)
    queries = torch.rand(9, 3, 6, 6, generator=gen)
    det = KNNDetector(RawPixels(grayscale=False), k=k, distance=distance).fit(_batches(normals, 7))
    got = det.score(_batches(queries, 4))
    expected = _brute(normals.flatten(1).numpy(), queries.flatten(1).numpy(), k, distance)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-4)
    ref = KNNScorer(k=k, distance=distance).fit(normals.flatten(1)).score(queries.flatten(1))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(det.scorer.bank, normals.flatten(1))  # the bank holds the batches in order


def test_knn_detector_grey_features():
    gen = torch.Generator().manual_seed(6)
    normals = torch.rand(10, 3, 4, 4, generator=gen)
    det = KNNDetector(RawPixels(), k=2).fit(_batches(normals, 3))
    assert det.scorer.bank.shape == (10, 16)
    torch.testing.assert_close(det.scorer.bank, normals.mean(1).flatten(1))


def test_knn_detector_empty_input_is_an_error():
    det = KNNDetector(RawPixels(), name="mydet")
    with pytest.raises(ValueError, match="mydet: bank: no images"):
        det.fit([])


def test_knn_detector_puts_extractor_in_eval_mode_and_no_grad():
    extractor = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Dropout(0.9))
    det = KNNDetector(extractor, k=1)
    assert not extractor.training
    normals = torch.rand(5, 3, 2, 2)
    det.fit(_batches(normals, 5))
    assert not det.scorer.bank.requires_grad
    # dropout off: the bank is the plain flattened images
    assert torch.equal(det.scorer.bank, normals.flatten(1))


def test_faiss_backend_equals_the_torch_search():
    gen = torch.Generator().manual_seed(3)
    bank, queries = torch.randn(500, 24, generator=gen), torch.randn(77, 24, generator=gen)
    for k, distance in ((2, "squared"), (3, "euclidean")):
        exact = KNNScorer(k=k, distance=distance).fit(bank).score(queries)
        fast = KNNScorer(k=k, distance=distance, backend="faiss").fit(bank).score(queries)
        assert torch.allclose(fast, exact, rtol=1e-4, atol=1e-4)


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="backend"):
        KNNScorer(backend="annoy")
