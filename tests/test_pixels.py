"""anomgen.pixels: the named range conversions, against torchvision / open_clip / numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms import Normalize

from anomgen import pixels
from anomgen.pixels import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    clip_normalize,
    from_diffusion_range,
    imagenet_normalize,
    to_diffusion_range,
    to_uint8,
)


def _rand(*shape, seed=0, dtype=torch.float32):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_diffusion_range_endpoints():
    x = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(to_diffusion_range(x), torch.tensor([-1.0, -0.5, 0.0, 1.0]))
    torch.testing.assert_close(from_diffusion_range(torch.tensor([-1.0, -0.5, 0.0, 1.0])), x)


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 3, 5, 7)])
def test_diffusion_round_trip(shape):
    x = _rand(*shape)
    y = to_diffusion_range(x)
    assert y.shape == x.shape
    assert y.min() >= -1.0 and y.max() <= 1.0
    torch.testing.assert_close(from_diffusion_range(y), x, rtol=0, atol=1e-6)
    # and the other way round for values inside [-1, 1]
    z = _rand(*shape, seed=1) * 2 - 1
    torch.testing.assert_close(to_diffusion_range(from_diffusion_range(z)), z, rtol=0, atol=1e-6)


def test_from_diffusion_range_clamps_overshoot():
    y = torch.tensor([-3.0, -1.2, -1.0, 1.0, 1.0001, 7.0, 0.5])
    out = from_diffusion_range(y)
    expected = np.clip((y.numpy() + 1) / 2, 0, 1)
    np.testing.assert_allclose(out.numpy(), expected, rtol=0, atol=1e-7)
    assert out.min() == 0.0 and out.max() == 1.0


def test_to_diffusion_range_does_not_clamp_and_keeps_dtype():
    x = torch.tensor([-0.5, 1.5], dtype=torch.float64)
    y = to_diffusion_range(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, torch.tensor([-2.0, 2.0], dtype=torch.float64))


def test_conversions_do_not_modify_input():
    x = _rand(3, 4, 4)
    x0 = x.clone()
    for fn in (to_diffusion_range, from_diffusion_range, imagenet_normalize, clip_normalize, to_uint8):
        fn(x)
        assert torch.equal(x, x0), fn.__name__


# ------------------------------------------------------------------------------------------------- normalisation


def test_clip_constants_are_open_clips():
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    assert tuple(CLIP_MEAN) == tuple(OPENAI_DATASET_MEAN)
    assert tuple(CLIP_STD) == tuple(OPENAI_DATASET_STD)


def test_imagenet_constants_are_torchvisions():
    # torchvision's pretrained-weights transforms use these
    from torchvision.transforms._presets import ImageClassification

    preset = ImageClassification(crop_size=224)
    assert tuple(preset.mean) == IMAGENET_MEAN and tuple(preset.std) == IMAGENET_STD


@pytest.mark.parametrize(
    "fn, mean, std", [(imagenet_normalize, IMAGENET_MEAN, IMAGENET_STD), (clip_normalize, CLIP_MEAN, CLIP_STD)]
)
@pytest.mark.parametrize("batched", [False, True])
def test_normalize_matches_torchvision(fn, mean, std, batched):
    x = _rand(4, 3, 6, 5) if batched else _rand(3, 6, 5)
    ref = Normalize(mean, std)(x)
    out = fn(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    # and against a per-channel numpy computation
    arr = x.numpy().astype(np.float64)
    m = np.asarray(mean)[:, None, None]
    s = np.asarray(std)[:, None, None]
    np.testing.assert_allclose(out.numpy(), (arr - m) / s, rtol=1e-5, atol=1e-5)


def test_normalize_per_channel_on_constant_images():
    x = torch.ones(2, 3, 2, 2)
    out = imagenet_normalize(x)
    for c in range(3):
        expected = (1.0 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]
        torch.testing.assert_close(out[:, c], torch.full((2, 2, 2), expected))
    # unbatched: channel 0 is the channel, not the batch
    out = clip_normalize(torch.zeros(3, 1, 1))
    torch.testing.assert_close(out.flatten(), torch.tensor([-m / s for m, s in zip(CLIP_MEAN, CLIP_STD)]))


def test_normalize_keeps_double():
    x = _rand(3, 2, 2, dtype=torch.float64)
    out = clip_normalize(x)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, Normalize(CLIP_MEAN, CLIP_STD)(x))


# ---------------------------------------------------------------------------------------------------------- uint8


def test_to_uint8_rounds_and_clamps():
    x = torch.tensor([-0.5, 0.0, 0.4 / 255, 0.6 / 255, 1.4 / 255, 127.6 / 255, 254.49 / 255, 1.0, 1.7])
    out = to_uint8(x)
    assert out.dtype == torch.uint8
    assert out.tolist() == [0, 0, 0, 1, 1, 128, 254, 255, 255]


def test_to_uint8_matches_numpy_and_pil_convention():
    x = _rand(2, 3, 9, 9, seed=3) * 1.2 - 0.1
    expected = np.rint(np.clip(x.numpy().astype(np.float64), 0, 1) * 255).astype(np.uint8)
    out = to_uint8(x)
    assert out.shape == x.shape
    # float32 vs float64 products can differ exactly at .5; allow at most one level there
    assert np.abs(out.numpy().astype(int) - expected.astype(int)).max() <= 1
    assert (out.numpy() == expected).mean() > 0.99


def test_uint8_round_trip_is_exact():
    levels = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(levels.float() / 255.0), levels)


def test_all_named_helpers_exported():
    for name in ("to_diffusion_range", "from_diffusion_range", "imagenet_normalize", "clip_normalize", "to_uint8"):
        assert callable(getattr(pixels, name))
