"""The noise-patch generator and the per-sample seeding it is driven by."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomgen.generators import NoisePatchGenerator
from anomgen.seeding import sample_generator, sample_seed


def _image(height=20, width=30, seed=0) -> torch.Tensor:
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed))


def _box_mask(height, width, box) -> torch.Tensor:
    top, left, h, w = box
    mask = torch.zeros(height, width)
    for y in range(top, top + h):
        for x in range(left, left + w):
            mask[y, x] = 1.0
    return mask


@pytest.mark.parametrize("index", range(12))
def test_mask_is_the_changed_box_and_outside_is_untouched(index):
    height, width = 20, 30
    image = _image(height, width, seed=index)
    gen = NoisePatchGenerator(0.2, 0.5)
    out, mask, params = gen(image, sample_generator(7, index))
    top, left, h, w = params["box"]
    assert all(isinstance(v, int) for v in params["box"])
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    assert out.shape == image.shape and mask.shape == (height, width)
    assert set(torch.unique(mask).tolist()) <= {0.0, 1.0}
    assert torch.equal(mask, _box_mask(height, width, params["box"]))
    outside = mask == 0
    # bit-for-bit identical outside the box
    assert torch.equal(out[:, outside], image[:, outside])
    # inside the box the pixels are new uniform noise in [0, 1)
    inside = out[:, mask == 1]
    assert inside.min() >= 0.0 and inside.max() < 1.0
    assert (inside != image[:, mask == 1]).float().mean() > 0.99
    # the input is not modified in place
    assert torch.equal(image, _image(height, width, seed=index))


def test_changed_pixels_are_exactly_the_mask():
    """On an all-ones image (noise is < 1) every box pixel changes in every channel, nothing else does."""
    image = torch.ones(3, 16, 16)
    for index in range(20):
        out, mask, _ = NoisePatchGenerator(0.1, 0.9)(image, sample_generator(0, index))
        changed = (out != image).any(0)
        assert torch.equal(changed, mask.bool())
        assert torch.equal((out != image).all(0), mask.bool())


def test_box_side_lengths_follow_the_fractions():
    height, width = 40, 50
    lo, hi = 0.25, 0.5
    gen = NoisePatchGenerator(lo, hi)
    hs, ws = [], []
    for index in range(200):
        _, mask, params = gen(torch.zeros(3, height, width), sample_generator(1, index))
        _, _, h, w = params["box"]
        hs.append(h)
        ws.append(w)
        assert round(height * lo) <= h <= round(height * hi)
        assert round(width * lo) <= w <= round(width * hi)
        assert mask.sum() == h * w
    # the draws spread over the range (not stuck at one value)
    assert len(set(hs)) > 5 and len(set(ws)) > 5


def test_full_fraction_covers_the_whole_image():
    image = _image(10, 12)
    out, mask, params = NoisePatchGenerator(1.0, 1.0)(image, sample_generator(0, 0))
    assert params["box"] == [0, 0, 10, 12]
    assert torch.equal(mask, torch.ones(10, 12))


def test_tiny_fraction_gives_at_least_one_pixel():
    out, mask, params = NoisePatchGenerator(0.01, 0.01)(_image(8, 8), sample_generator(0, 3))
    assert params["box"][2:] == [1, 1]
    assert mask.sum() == 1


def test_single_channel_image():
    image = torch.ones(1, 9, 9)
    out, mask, _ = NoisePatchGenerator()(image, sample_generator(0, 0))
    assert out.shape == (1, 9, 9)
    assert torch.equal((out != image)[0], mask.bool())


# --------------------------------------------------------------------------------------------------- determinism


def test_same_seed_and_index_give_identical_output():
    image = _image()
    gen = NoisePatchGenerator()
    a = gen(image, sample_generator(3, 11))
    b = gen(image, sample_generator(3, 11))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
    # a fresh generator object with the same settings too
    c = NoisePatchGenerator(0.2, 0.5)(image.clone(), sample_generator(3, 11))
    assert torch.equal(a[0], c[0])


def test_output_does_not_depend_on_what_ran_before():
    """The stream of sample i is its own: drawing other samples (or anything else) first changes nothing."""
    image = _image()
    gen = NoisePatchGenerator()
    alone = gen(image, sample_generator(5, 4))[0]
    torch.rand(100)  # global RNG use
    for i in range(4):
        gen(image, sample_generator(5, i))
    assert torch.equal(gen(image, sample_generator(5, 4))[0], alone)


def test_different_index_or_seed_gives_different_output():
    image = _image()
    gen = NoisePatchGenerator()
    outs = [gen(image, sample_generator(3, i))[0] for i in range(10)]
    for i in range(10):
        for j in range(i + 1, 10):
            assert not torch.equal(outs[i], outs[j]), (i, j)
    assert not torch.equal(gen(image, sample_generator(4, 0))[0], outs[0])


@pytest.mark.parametrize("lo, hi", [(0.0, 0.5), (-0.1, 0.5), (0.6, 0.5), (0.2, 1.1), (0.0, 0.0)])
def test_fractions_are_validated(lo, hi):
    with pytest.raises(ValueError, match=r"0 < min_fraction <= max_fraction <= 1"):
        NoisePatchGenerator(lo, hi)


def test_generator_name():
    assert NoisePatchGenerator.name == "noise_patch"


# ------------------------------------------------------------------------------------------------------- seeding


def test_sample_seed_is_stable_and_an_independent_recomputation():
    for base, index in [(0, 0), (0, 1), (123, 45678), (2**31, 10**9)]:
        state = np.random.SeedSequence([base, index]).generate_state(2, dtype=np.uint32)
        expected = (int(state[0]) << 31) ^ int(state[1])
        assert sample_seed(base, index) == expected
        assert sample_seed(base, index) == sample_seed(base, index)
        assert 0 <= sample_seed(base, index) < 2**63


def test_sample_seed_distinct_across_indices_and_bases():
    seeds = {sample_seed(base, i) for base in range(3) for i in range(2000)}
    assert len(seeds) == 3 * 2000
    # (base, index) is not collapsed into a single number: (0, 1) and (1, 0) differ
    assert sample_seed(0, 1) != sample_seed(1, 0)


def test_sample_seed_accepts_numpy_and_tensor_ints():
    assert sample_seed(np.int64(3), torch.tensor(5)) == sample_seed(3, 5)


def test_sample_generator_is_seeded_by_sample_seed():
    g = sample_generator(9, 2)
    assert g.initial_seed() == sample_seed(9, 2)
    ref = torch.Generator().manual_seed(sample_seed(9, 2))
    assert torch.equal(torch.rand(5, generator=g), torch.rand(5, generator=ref))
    assert g.device == torch.device("cpu")
