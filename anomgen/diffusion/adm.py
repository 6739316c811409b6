"""guided-diffusion's ADM UNet (Dhariwal & Nichol 2021) as a diffusers ``UNet2DModel``.

A checkpoint of openai/guided-diffusion (e.g. ``256x256_diffusion_uncond.pt``, the unconditional ImageNet 256×256
model) is a state dict keyed by ADM's module names. :func:`adm_unet_config` gives the ``UNet2DModel`` of the same
architecture, :func:`convert_adm_state_dict` renames (and, for attention, reshapes) every tensor into it, strictly, and
:func:`load_adm_unet` does both from a file or id. The whole project then uses one UNet class; h-space is the output of
``unet.mid_block`` (1024×8×8 for a 256×256 input).

How the two architectures line up
---------------------------------
* time embedding: ADM's sinusoid is ``[cos, sin]`` with frequencies ``exp(-ln(10⁴) i / half)``, which is diffusers'
  ``Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0)``; ``time_embed.0/2`` -> ``time_embedding.linear_1/2``.
* ``input_blocks.0.0`` -> ``conv_in``; each further input block is a ResBlock (+ AttentionBlock at an attention
  resolution) -> ``down_blocks.{level}.resnets.{j}`` (+ ``attentions.{j}``), or the level's downsampler (a ResBlock
  with ``down=True`` when ``resblock_updown``, else a stride-2 conv ``op``) -> ``down_blocks.{level}.downsamplers.0``.
* ``middle_block.0/1/2`` -> ``mid_block.resnets.0`` / ``mid_block.attentions.0`` / ``mid_block.resnets.1``.
* each output block is a ResBlock (+ attention) (+ the level's upsampler in its last block) ->
  ``up_blocks.{i}.resnets.{j}`` (+ ``attentions.{j}``) (+ ``upsamplers.0``); ``out.0/2`` -> ``conv_norm_out/conv_out``.
* ResBlock: ``in_layers.0/2`` -> ``norm1/conv1``, ``emb_layers.1`` -> ``time_emb_proj``, ``out_layers.0/3`` ->
  ``norm2/conv2``, ``skip_connection`` -> ``conv_shortcut``. With ``use_scale_shift_norm`` both compute
  ``norm2(h) (1 + scale) + shift`` (diffusers' ``resnet_time_scale_shift="scale_shift"``).
* AttentionBlock: ``norm`` -> ``group_norm``; the 1×1 conv1d ``qkv`` holds, per head, that head's q, k and v rows in
  turn (the legacy order), so its weight is read as (heads, 3, head_dim, C) and split into ``to_q/to_k/to_v``;
  ``proj_out`` -> ``to_out.0``. ADM's scale (q·d^-¼)(k·d^-¼) equals diffusers' d^-½.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from anomgen.errors import PretrainedNotFoundError
from anomgen.pretrained import in_pretrained_dir, load_state_dict_strict, load_weights_file, resolve

if TYPE_CHECKING:
    from diffusers import UNet2DModel

__all__ = [
    "ADM_256_UNCOND",
    "ADM_256_UNCOND_URL",
    "adm_unet_config",
    "convert_adm_state_dict",
    "eps_from_output",
    "load_adm_unet",
]

#: file name of guided-diffusion's unconditional ImageNet 256×256 model, the default id of :func:`load_adm_unet`
ADM_256_UNCOND = "256x256_diffusion_uncond.pt"
#: where openai/guided-diffusion publishes it
ADM_256_UNCOND_URL = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/256x256_diffusion_uncond.pt"

#: guided-diffusion's channel multipliers per image size, where the first is 1 (512 starts at 0.5: not supported)
DEFAULT_CHANNEL_MULT = {256: (1, 1, 2, 2, 4, 4), 128: (1, 1, 2, 3, 4), 64: (1, 2, 3, 4)}
NORM_GROUPS = 32


def adm_unet_config(image_size: int = 256, num_channels: int = 256, num_res_blocks: int = 2,
                    channel_mult: Sequence[float] | None = None, attention_resolutions: Sequence[int] = (32, 16, 8),
                    num_head_channels: int = 64, learn_sigma: bool = True, in_channels: int = 3,
                    resblock_updown: bool = True, use_scale_shift_norm: bool = True) -> dict:
    """``UNet2DModel`` kwargs with ADM's architecture (the defaults are the ImageNet 256 unconditional model's flags).

    Attention sits at the levels whose resolution ``image_size // 2**level`` is in ``attention_resolutions`` (and in
    the middle block); ``channel_mult`` defaults to guided-diffusion's for ``image_size``."""
    if channel_mult is None:
        if image_size not in DEFAULT_CHANNEL_MULT:
            raise ValueError(f"no default channel_mult for image_size {image_size} (known: "
                             f"{sorted(DEFAULT_CHANNEL_MULT)}); pass channel_mult")
        channel_mult = DEFAULT_CHANNEL_MULT[image_size]
    channel_mult = tuple(channel_mult)
    if not channel_mult or channel_mult[0] != 1:
        raise ValueError(f"channel_mult must start with 1 (the time embedding width follows the first level in "
                         f"UNet2DModel), got {channel_mult}")
    widths = [mult * num_channels for mult in channel_mult]
    if any(w != int(w) or w % NORM_GROUPS for w in widths):
        raise ValueError(f"every level width channel_mult * num_channels must be a whole multiple of {NORM_GROUPS}, "
                         f"got {widths}")
    block_out_channels = tuple(int(w) for w in widths)
    # guided-diffusion turns resolutions into downsampling rates with image_size // resolution
    attention_rates = {image_size // int(res) for res in attention_resolutions}
    with_attention = [2**level in attention_rates for level in range(len(channel_mult))]
    for width, attends in zip([*block_out_channels, block_out_channels[-1]], [*with_attention, True]):
        if attends and width % num_head_channels:
            raise ValueError(f"attention width {width} is not divisible by num_head_channels {num_head_channels}")
    if resblock_updown:
        plain_down, plain_up, resample = "ResnetDownsampleBlock2D", "ResnetUpsampleBlock2D", "resnet"
    else:
        plain_down, plain_up, resample = "DownBlock2D", "UpBlock2D", "conv"
    down_block_types = tuple("AttnDownBlock2D" if attends else plain_down for attends in with_attention)
    up_block_types = tuple("AttnUpBlock2D" if attends else plain_up for attends in reversed(with_attention))
    return {
        "sample_size": image_size,
        "in_channels": in_channels,
        "out_channels": 2 * in_channels if learn_sigma else in_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "down_block_types": down_block_types,
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": up_block_types,
        "block_out_channels": block_out_channels,
        "layers_per_block": num_res_blocks,
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "downsample_type": resample,
        "upsample_type": resample,
        "dropout": 0.0,
        "act_fn": "silu",
        "attention_head_dim": num_head_channels,
        "norm_num_groups": NORM_GROUPS,
        # UNetMidBlock2D drops its attention group norm under scale_shift unless given a group count; ADM has one
        "attn_norm_num_groups": NORM_GROUPS,
        "norm_eps": 1e-5,
        "resnet_time_scale_shift": "scale_shift" if use_scale_shift_norm else "default",
        "add_attention": True,
    }


def _module_pairs(unet: nn.Module) -> Iterator[tuple[str, str, nn.Module]]:
    """``(ADM prefix, diffusers prefix, diffusers module)`` for every module of ``unet`` that holds weights."""
    yield "time_embed.0", "time_embedding.linear_1", unet.time_embedding.linear_1
    yield "time_embed.2", "time_embedding.linear_2", unet.time_embedding.linear_2
    yield "input_blocks.0.0", "conv_in", unet.conv_in
    adm_block = 1
    for level, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            yield f"input_blocks.{adm_block}.0", f"down_blocks.{level}.resnets.{j}", resnet
            if attentions is not None:
                yield f"input_blocks.{adm_block}.1", f"down_blocks.{level}.attentions.{j}", attentions[j]
            adm_block += 1
        if block.downsamplers is not None:
            yield f"input_blocks.{adm_block}.0", f"down_blocks.{level}.downsamplers.0", block.downsamplers[0]
            adm_block += 1
    mid = unet.mid_block
    yield "middle_block.0", "mid_block.resnets.0", mid.resnets[0]
    for j, (attention, resnet) in enumerate(zip(mid.attentions, mid.resnets[1:])):
        yield f"middle_block.{2 * j + 1}", f"mid_block.attentions.{j}", attention
        yield f"middle_block.{2 * j + 2}", f"mid_block.resnets.{j + 1}", resnet
    adm_block = 0
    for i, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            yield f"output_blocks.{adm_block}.0", f"up_blocks.{i}.resnets.{j}", resnet
            layer = 1
            if attentions is not None:
                yield f"output_blocks.{adm_block}.1", f"up_blocks.{i}.attentions.{j}", attentions[j]
                layer = 2
            if j == len(block.resnets) - 1 and block.upsamplers is not None:
                yield f"output_blocks.{adm_block}.{layer}", f"up_blocks.{i}.upsamplers.0", block.upsamplers[0]
            adm_block += 1
    yield "out.0", "conv_norm_out", unet.conv_norm_out
    yield "out.2", "conv_out", unet.conv_out


class _Converter:
    """Takes ADM tensors by key, records the keys it was asked for and did not find, and collects the output."""

    def __init__(self, adm_state: Mapping[str, Tensor]) -> None:
        self.adm_state = adm_state
        self.used: set[str] = set()
        self.absent: list[str] = []
        self.out: dict[str, Tensor] = {}
        self.source: dict[str, str] = {}  # converted key -> the ADM key it came from

    def take(self, key: str) -> Tensor | None:
        if key not in self.adm_state:
            self.absent.append(key)
            return None
        self.used.add(key)
        return self.adm_state[key]

    def copy(self, adm_prefix: str, prefix: str, names: Sequence[tuple[str, str]] = (("weight", "weight"),
                                                                                     ("bias", "bias"))) -> None:
        for adm_name, name in names:
            value = self.take(f"{adm_prefix}.{adm_name}")
            if value is not None:
                self.put(f"{prefix}.{name}", value, f"{adm_prefix}.{adm_name}")

    def put(self, key: str, value: Tensor, adm_key: str) -> None:
        self.out[key] = value
        self.source[key] = adm_key

    def resnet(self, adm_prefix: str, prefix: str, resnet: nn.Module) -> None:
        for adm_name, name in (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
                               ("out_layers.0", "norm2"), ("out_layers.3", "conv2")):
            self.copy(f"{adm_prefix}.{adm_name}", f"{prefix}.{name}")
        if resnet.conv_shortcut is not None:
            self.copy(f"{adm_prefix}.skip_connection", f"{prefix}.conv_shortcut")

    def attention(self, adm_prefix: str, prefix: str, attention: nn.Module) -> None:
        heads = attention.heads
        if attention.group_norm is not None:
            self.copy(f"{adm_prefix}.norm", f"{prefix}.group_norm")
        weight, bias = self.take(f"{adm_prefix}.qkv.weight"), self.take(f"{adm_prefix}.qkv.bias")
        if weight is not None and bias is not None:
            channels = weight.shape[1]
            if weight.shape != (3 * channels, channels, 1) or bias.shape != (3 * channels,) or channels % heads:
                raise ValueError(f"ADM key {adm_prefix}.qkv: expected weight (3C, C, 1) and bias (3C,) with C "
                                 f"divisible by {heads} heads, got {tuple(weight.shape)} and {tuple(bias.shape)}")
            # legacy order: the 3C rows are heads × (q, k, v) × head_dim
            weight = weight.reshape(heads, 3, channels // heads, channels)
            bias = bias.reshape(heads, 3, channels // heads)
            for index, name in enumerate(("to_q", "to_k", "to_v")):
                self.put(f"{prefix}.{name}.weight", weight[:, index].reshape(channels, channels).contiguous(),
                         f"{adm_prefix}.qkv.weight")
                self.put(f"{prefix}.{name}.bias", bias[:, index].reshape(channels).contiguous(),
                         f"{adm_prefix}.qkv.bias")
        weight = self.take(f"{adm_prefix}.proj_out.weight")
        if weight is not None:
            self.put(f"{prefix}.to_out.0.weight", weight.reshape(weight.shape[0], -1).contiguous(),
                     f"{adm_prefix}.proj_out.weight")
        self.copy(f"{adm_prefix}.proj_out", f"{prefix}.to_out.0", names=(("bias", "bias"),))


def _convert(adm_state: Mapping[str, Tensor], unet: nn.Module) -> dict[str, Tensor]:
    from diffusers.models.attention_processor import Attention
    from diffusers.models.downsampling import Downsample2D
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.upsampling import Upsample2D

    converter = _Converter(adm_state)
    for adm_prefix, prefix, module in _module_pairs(unet):
        if isinstance(module, ResnetBlock2D):
            converter.resnet(adm_prefix, prefix, module)
        elif isinstance(module, Attention):
            converter.attention(adm_prefix, prefix, module)
        elif isinstance(module, Downsample2D):
            converter.copy(f"{adm_prefix}.op", f"{prefix}.conv")
        elif isinstance(module, Upsample2D):
            converter.copy(f"{adm_prefix}.conv", f"{prefix}.conv")
        elif isinstance(module, (nn.Conv2d, nn.Linear, nn.GroupNorm)):
            converter.copy(adm_prefix, prefix)
        else:
            raise TypeError(f"no ADM counterpart for {prefix} ({type(module).__name__})")
    expected = unet.state_dict()
    problems = {
        "ADM keys the architecture needs but the checkpoint lacks": converter.absent,
        "ADM keys with no place in the architecture": sorted(set(adm_state) - converter.used),
        "UNet2DModel keys that got no value": sorted(set(expected) - set(converter.out)),
        "converted keys that UNet2DModel lacks": sorted(set(converter.out) - set(expected)),
        "shape mismatches": sorted(
            f"{converter.source[key]} -> {key}: {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
            for key, value in converter.out.items()
            if key in expected and value.shape != expected[key].shape
        ),
    }
    problems = {what: keys for what, keys in problems.items() if keys}
    if problems:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")

        raise ValueError("the ADM state dict does not fit the configured architecture; "
                         + "; ".join(f"{what}: {show(keys)}" for what, keys in problems.items()))
    return converter.out


def convert_adm_state_dict(adm_state: Mapping[str, Tensor], config: dict) -> dict[str, Tensor]:
    """ADM-keyed tensors -> the state dict of ``UNet2DModel(**config)``; a key left over on either side, or a shape
    that does not fit, is a ``ValueError`` naming the first offending keys."""
    from diffusers import UNet2DModel

    with torch.device("meta"):
        unet = UNet2DModel(**config)
    return _convert(adm_state, unet)


def load_adm_unet(path_or_id: str | os.PathLike = ADM_256_UNCOND, **config_overrides) -> UNet2DModel:
    """A guided-diffusion checkpoint (a ``.pt`` state dict; a path or an id resolved by
    :func:`anomgen.pretrained.resolve`) as a ``UNet2DModel`` of ``adm_unet_config(**config_overrides)``, in eval
    mode."""
    from diffusers import UNet2DModel

    try:
        path = resolve(path_or_id)
    except PretrainedNotFoundError as err:
        raise PretrainedNotFoundError(
            f"{err} A guided-diffusion checkpoint is a .pt file: the unconditional ImageNet 256x256 model "
            f"{ADM_256_UNCOND} is published at {ADM_256_UNCOND_URL}; put it at {in_pretrained_dir(ADM_256_UNCOND)} "
            "(and use that id) or pass the file's path."
        ) from err
    if path.is_dir():
        raise ValueError(f"{path_or_id!r} resolved to the folder {path}; expected a guided-diffusion .pt file "
                         f"such as {ADM_256_UNCOND}")
    config = adm_unet_config(**config_overrides)
    with torch.device("meta"):  # the 552M-parameter model gets the checkpoint's tensors, not a random init first
        unet = UNet2DModel(**config)
    state = _convert(load_weights_file(path), unet)
    load_state_dict_strict(unet, state, source=str(path), assign=True)
    return unet.eval()


def eps_from_output(output: Tensor, in_channels: int) -> Tensor:
    """The ε channels of an ADM output: the first ``in_channels`` of a ``2 * in_channels`` output (ε and the
    learned-σ interpolation), the whole output when it has ``in_channels``."""
    channels = output.shape[1]
    if channels == 2 * in_channels:
        return output[:, :in_channels]
    if channels == in_channels:
        return output
    raise ValueError(f"an ADM output for {in_channels}-channel images has {in_channels} or {2 * in_channels} "
                     f"channels, got {channels}")
