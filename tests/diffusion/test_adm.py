"""guided-diffusion ADM checkpoints as diffusers UNet2DModel: the converted model against an independent functional
ADM forward pass (adm_reference.py), strict key handling, the real 256×256 architecture on the meta device, loading."""

from __future__ import annotations

import math

import pytest
import torch
from adm_reference import adm_forward, adm_param_shapes, random_adm_state_dict

from anomgen.diffusion.adm import (
    ADM_256_UNCOND,
    adm_unet_config,
    convert_adm_state_dict,
    eps_from_output,
    load_adm_unet,
)
from anomgen.errors import PretrainedNotFoundError
from anomgen.pretrained import ENV_DIR

# 16 -> 8 -> 4, attention at 8 and 4 (2 heads at 32 channels, 4 heads at 64)
TINY = dict(image_size=16, num_channels=32, num_res_blocks=1, channel_mult=(1, 2, 2), attention_resolutions=(8, 4),
            num_head_channels=16, learn_sigma=True, in_channels=3, resblock_updown=True, use_scale_shift_norm=True)
VARIANTS = {
    "resblock_updown": TINY,
    "conv_resample": {**TINY, "resblock_updown": False, "num_res_blocks": 2},
    "conv_resample_additive_emb": {**TINY, "resblock_updown": False, "use_scale_shift_norm": False},
}
# the real model: guided-diffusion's 256x256_diffusion_uncond.pt flags
ADM_256 = dict(image_size=256, num_channels=256, num_res_blocks=2, channel_mult=(1, 1, 2, 2, 4, 4),
               attention_resolutions=(32, 16, 8), num_head_channels=64, learn_sigma=True, in_channels=3,
               resblock_updown=True, use_scale_shift_norm=True)


def tiny_unet(cfg: dict, state: dict):
    from diffusers import UNet2DModel

    from anomgen.pretrained import load_state_dict_strict

    config = adm_unet_config(**cfg)
    unet = UNet2DModel(**config).eval()
    load_state_dict_strict(unet, convert_adm_state_dict(state, config), source="tiny ADM")
    return unet


def inputs(cfg: dict) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, cfg["in_channels"], cfg["image_size"], cfg["image_size"], generator=gen)
    return x, torch.tensor([7, 930])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@torch.no_grad()
def test_converted_unet_matches_reference_forward(variant):
    cfg = VARIANTS[variant]
    state = random_adm_state_dict(cfg, seed=0)
    unet = tiny_unet(cfg, state)
    x, t = inputs(cfg)
    reference_h: list[torch.Tensor] = []
    expected = adm_forward(state, cfg, x, t, middle_out=reference_h)
    h = {}
    handle = unet.mid_block.register_forward_hook(lambda module, args, out: h.update(out=out))
    out = unet(x, t).sample
    handle.remove()
    assert out.shape == (2, 6, 16, 16)
    assert expected.abs().mean() > 0.1  # a live network, not a near-zero output
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(h["out"], reference_h[0], atol=1e-4, rtol=1e-4)
    # the two timesteps matter: the same image at the other timestep gives another output
    swapped = unet(x[:1], t[1:]).sample
    assert (swapped - out[:1]).abs().max() > 1e-2


@torch.no_grad()
def test_qkv_split_in_the_wrong_order_is_detected():
    """The forward comparison is sensitive to the legacy per-head q/k/v layout: a checkpoint whose qkv rows are read
    as [all q, all k, all v] (guided-diffusion's other order) gives a visibly different output."""
    state = random_adm_state_dict(TINY, seed=0)
    reordered = dict(state)
    for key in [k for k in state if ".qkv." in k]:
        channels = state[key].shape[0] // 3
        heads = channels // TINY["num_head_channels"]
        rows = state[key].reshape(3, heads, channels // heads, *state[key].shape[1:])
        reordered[key] = rows.transpose(0, 1).reshape(state[key].shape)
    x, t = inputs(TINY)
    assert (tiny_unet(TINY, reordered)(x, t).sample - adm_forward(state, TINY, x, t)).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        ("drop", "input_blocks.3.1.qkv.bias"),
        ("drop", "output_blocks.0.0.skip_connection.weight"),
        ("add", "input_blocks.1.0.extra_layer.weight"),
        ("add", "label_emb.weight"),
        ("reshape", "out.2.weight"),
    ],
)
def test_key_mismatch_is_an_error_naming_the_key(edit, named):
    state = random_adm_state_dict(TINY, seed=0)
    if edit == "drop":
        del state[named]
    elif edit == "add":
        state[named] = torch.zeros(4, 4)
    else:
        state[named] = torch.zeros(5, 32, 3, 3)
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        convert_adm_state_dict(state, adm_unet_config(**TINY))


def test_real_adm_256_architecture_on_meta_device():
    """The default config is the 552.8 M-parameter ADM-256 unconditional UNet: every key of its checkpoint converts
    strictly, and h (the mid block's output) is 1024×8×8 for a 256×256 input."""
    from diffusers import UNet2DModel

    config = adm_unet_config()
    assert config == adm_unet_config(**ADM_256)
    for level, block_type in enumerate(config["down_block_types"]):
        assert ("Attn" in block_type) == (256 // 2**level in (32, 16, 8))
    with torch.device("meta"):
        unet = UNet2DModel(**config)
    norms = [m for m in unet.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert all(m.num_groups == 32 and m.eps == 1e-5 for m in norms)  # ADM's GroupNorm32
    shapes = adm_param_shapes(ADM_256)
    count = sum(p.numel() for p in unet.parameters())
    assert count == sum(math.prod(s) for s in shapes.values())
    assert abs(count - 552.8e6) < 0.1e6
    converted = convert_adm_state_dict(random_adm_state_dict(ADM_256, device="meta"), config)
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in unet.state_dict().items()}
    h = {}
    unet.mid_block.register_forward_hook(lambda module, args, out: h.update(shape=tuple(out.shape)))
    out = unet(torch.empty(1, 3, 256, 256, device="meta"), torch.tensor([500], device="meta")).sample
    assert h["shape"] == (1, 1024, 8, 8)
    assert tuple(out.shape) == (1, 6, 256, 256)


@torch.no_grad()
def test_load_adm_unet_from_path_and_from_pretrained_dir(tmp_path, monkeypatch):
    state = random_adm_state_dict(TINY, seed=3)
    path = tmp_path / "tiny_adm.pt"
    torch.save(state, path)
    x, t = inputs(TINY)
    expected = adm_forward(state, TINY, x, t)
    from diffusers import UNet2DModel

    built_on = []
    init = UNet2DModel.__init__

    def spy(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built_on.append(next(self.parameters()).device.type)

    monkeypatch.setattr(UNet2DModel, "__init__", spy)
    unet = load_adm_unet(str(path), **TINY)
    assert built_on == ["meta"]  # no random init of the full model before the checkpoint's tensors replace it
    assert not unet.training and not any(p.is_meta for p in unet.parameters())
    torch.testing.assert_close(unet(x, t).sample, expected, atol=1e-4, rtol=1e-4)
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    torch.testing.assert_close(load_adm_unet("tiny_adm.pt", **TINY)(x, t).sample, expected, atol=1e-4, rtol=1e-4)


def test_load_adm_unet_missing_checkpoint_offline_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PretrainedNotFoundError, match=ADM_256_UNCOND.replace(".", r"\.")) as err:
        load_adm_unet(ADM_256_UNCOND)
    assert ENV_DIR in str(err.value)


def test_eps_from_output():
    out = torch.randn(2, 6, 4, 4)
    assert torch.equal(eps_from_output(out, 3), out[:, :3])
    eps_only = out[:, :3]
    assert eps_from_output(eps_only, 3) is eps_only
    with pytest.raises(ValueError, match="5"):
        eps_from_output(out[:, :5], 3)


def test_config_rejects_what_unet2dmodel_cannot_express():
    with pytest.raises(ValueError, match="channel_mult"):
        adm_unet_config(image_size=512)  # guided-diffusion's 512 model starts at 0.5 × num_channels
    with pytest.raises(ValueError, match="num_head_channels"):
        adm_unet_config(**{**TINY, "num_head_channels": 24})
