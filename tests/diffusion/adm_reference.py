"""An independent, functional forward pass of guided-diffusion's ADM UNet on an ADM-keyed state dict, and random
ADM-keyed state dicts for small configs. Used only by the tests, as the oracle for the converted diffusers UNet.

A config is a dict with the keys of ``anomgen.diffusion.adm.adm_unet_config`` (``channel_mult`` given explicitly).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

GROUPS = 32
EPS = 1e-5


def adm_layout(cfg: dict) -> tuple[list[list[tuple]], list[tuple], list[list[tuple]]]:
    """ADM's input blocks, middle block and output blocks, each a list of layers ``(kind, in_ch, out_ch)`` with kind
    one of ``conv_in``, ``res``, ``res_down``, ``res_up``, ``attn``, ``down_conv``, ``up_conv``."""
    mc, mults = cfg["num_channels"], cfg["channel_mult"]
    attention_rates = {cfg["image_size"] // r for r in cfg["attention_resolutions"]}
    ch = int(mults[0] * mc)
    inputs: list[list[tuple]] = [[("conv_in", cfg["in_channels"], ch)]]
    skip_channels = [ch]
    rate = 1
    for level, mult in enumerate(mults):
        for _ in range(cfg["num_res_blocks"]):
            out = int(mult * mc)
            block = [("res", ch, out)]
            ch = out
            if rate in attention_rates:
                block.append(("attn", ch, ch))
            inputs.append(block)
            skip_channels.append(ch)
        if level != len(mults) - 1:
            inputs.append([("res_down" if cfg["resblock_updown"] else "down_conv", ch, ch)])
            skip_channels.append(ch)
            rate *= 2
    middle = [("res", ch, ch), ("attn", ch, ch), ("res", ch, ch)]
    outputs: list[list[tuple]] = []
    for level, mult in reversed(list(enumerate(mults))):
        for i in range(cfg["num_res_blocks"] + 1):
            out = int(mult * mc)
            block = [("res", ch + skip_channels.pop(), out)]
            ch = out
            if rate in attention_rates:
                block.append(("attn", ch, ch))
            if level and i == cfg["num_res_blocks"]:
                block.append(("res_up" if cfg["resblock_updown"] else "up_conv", ch, ch))
                rate //= 2
            outputs.append(block)
    return inputs, middle, outputs


def _layer_shapes(prefix: str, kind: str, cin: int, cout: int, cfg: dict) -> dict[str, tuple]:
    emb = 4 * cfg["num_channels"]
    if kind == "conv_in":
        return {f"{prefix}.weight": (cout, cin, 3, 3), f"{prefix}.bias": (cout,)}
    if kind == "down_conv":
        return {f"{prefix}.op.weight": (cout, cin, 3, 3), f"{prefix}.op.bias": (cout,)}
    if kind == "up_conv":
        return {f"{prefix}.conv.weight": (cout, cin, 3, 3), f"{prefix}.conv.bias": (cout,)}
    if kind == "attn":
        return {f"{prefix}.norm.weight": (cin,), f"{prefix}.norm.bias": (cin,),
                f"{prefix}.qkv.weight": (3 * cin, cin, 1), f"{prefix}.qkv.bias": (3 * cin,),
                f"{prefix}.proj_out.weight": (cin, cin, 1), f"{prefix}.proj_out.bias": (cin,)}
    emb_out = 2 * cout if cfg["use_scale_shift_norm"] else cout
    shapes = {f"{prefix}.in_layers.0.weight": (cin,), f"{prefix}.in_layers.0.bias": (cin,),
              f"{prefix}.in_layers.2.weight": (cout, cin, 3, 3), f"{prefix}.in_layers.2.bias": (cout,),
              f"{prefix}.emb_layers.1.weight": (emb_out, emb), f"{prefix}.emb_layers.1.bias": (emb_out,),
              f"{prefix}.out_layers.0.weight": (cout,), f"{prefix}.out_layers.0.bias": (cout,),
              f"{prefix}.out_layers.3.weight": (cout, cout, 3, 3), f"{prefix}.out_layers.3.bias": (cout,)}
    if cin != cout:
        shapes |= {f"{prefix}.skip_connection.weight": (cout, cin, 1, 1), f"{prefix}.skip_connection.bias": (cout,)}
    return shapes


def adm_param_shapes(cfg: dict) -> dict[str, tuple]:
    """Every key of an ADM state dict for ``cfg`` and its shape, in module order."""
    mc = cfg["num_channels"]
    shapes = {"time_embed.0.weight": (4 * mc, mc), "time_embed.0.bias": (4 * mc,),
              "time_embed.2.weight": (4 * mc, 4 * mc), "time_embed.2.bias": (4 * mc,)}
    inputs, middle, outputs = adm_layout(cfg)
    for group, blocks in (("input_blocks", inputs), ("middle_block", [middle]), ("output_blocks", outputs)):
        for i, block in enumerate(blocks):
            for j, (kind, cin, cout) in enumerate(block):
                prefix = f"middle_block.{j}" if group == "middle_block" else f"{group}.{i}.{j}"
                shapes |= _layer_shapes(prefix, kind, cin, cout, cfg)
    ch = int(cfg["channel_mult"][0] * mc)
    out_channels = 2 * cfg["in_channels"] if cfg["learn_sigma"] else cfg["in_channels"]
    shapes |= {"out.0.weight": (ch,), "out.0.bias": (ch,), "out.2.weight": (out_channels, ch, 3, 3),
               "out.2.bias": (out_channels,)}
    return shapes


def random_adm_state_dict(cfg: dict, seed: int = 0, device: str | torch.device = "cpu") -> dict[str, Tensor]:
    """Random normal tensors for every ADM key (no zero init, so every weight matters): weights of convs and linears
    with std 1/sqrt(fan_in), norm scales around 1, biases with std 0.2. On the meta device, shapes only."""
    shapes = adm_param_shapes(cfg)
    if torch.device(device).type == "meta":
        return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        value = torch.randn(shape, generator=gen)
        if len(shape) > 1:
            value = value / math.sqrt(math.prod(shape[1:]))
        elif key.endswith(".weight"):  # a group norm's scale
            value = 1.0 + 0.2 * value
        else:
            value = 0.2 * value
        state[key] = value.to(device)
    return state


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """[cos(t f_i), sin(t f_i)] with f_i = 10000^(-i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _norm(x: Tensor, sd: dict, prefix: str) -> Tensor:
    return F.group_norm(x, GROUPS, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], EPS)


def _resblock(x: Tensor, emb: Tensor, sd: dict, p: str, scale_shift: bool, resample: str | None) -> Tensor:
    h = F.silu(_norm(x, sd, f"{p}.in_layers.0"))
    if resample == "down":
        h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    elif resample == "up":
        h, x = F.interpolate(h, scale_factor=2, mode="nearest"), F.interpolate(x, scale_factor=2, mode="nearest")
    h = F.conv2d(h, sd[f"{p}.in_layers.2.weight"], sd[f"{p}.in_layers.2.bias"], padding=1)
    emb_out = F.linear(F.silu(emb), sd[f"{p}.emb_layers.1.weight"], sd[f"{p}.emb_layers.1.bias"])[:, :, None, None]
    if scale_shift:
        scale, shift = emb_out.chunk(2, dim=1)
        h = _norm(h, sd, f"{p}.out_layers.0") * (1 + scale) + shift
    else:
        h = _norm(h + emb_out, sd, f"{p}.out_layers.0")
    h = F.conv2d(F.silu(h), sd[f"{p}.out_layers.3.weight"], sd[f"{p}.out_layers.3.bias"], padding=1)
    if f"{p}.skip_connection.weight" in sd:
        x = F.conv2d(x, sd[f"{p}.skip_connection.weight"], sd[f"{p}.skip_connection.bias"])
    return x + h


def _attention(x: Tensor, sd: dict, p: str, head_channels: int) -> Tensor:
    """Self-attention with the legacy layout: the qkv channels are, per head, that head's q, k and v in turn."""
    b, c, height, width = x.shape
    heads = c // head_channels
    flat = x.reshape(b, c, -1)
    qkv = F.conv1d(_norm(flat, sd, f"{p}.norm"), sd[f"{p}.qkv.weight"], sd[f"{p}.qkv.bias"])
    q, k, v = qkv.reshape(b * heads, 3 * head_channels, -1).split(head_channels, dim=1)
    weights = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(head_channels), dim=-1)
    attended = torch.einsum("bts,bcs->bct", weights, v).reshape(b, c, -1)
    out = F.conv1d(attended, sd[f"{p}.proj_out.weight"], sd[f"{p}.proj_out.bias"])
    return (flat + out).reshape(b, c, height, width)


def _layer(kind: str, h: Tensor, emb: Tensor, sd: dict, p: str, cfg: dict) -> Tensor:
    scale_shift = cfg["use_scale_shift_norm"]
    if kind == "conv_in":
        return F.conv2d(h, sd[f"{p}.weight"], sd[f"{p}.bias"], padding=1)
    if kind == "res":
        return _resblock(h, emb, sd, p, scale_shift, None)
    if kind == "res_down":
        return _resblock(h, emb, sd, p, scale_shift, "down")
    if kind == "res_up":
        return _resblock(h, emb, sd, p, scale_shift, "up")
    if kind == "attn":
        return _attention(h, sd, p, cfg["num_head_channels"])
    if kind == "down_conv":
        return F.conv2d(h, sd[f"{p}.op.weight"], sd[f"{p}.op.bias"], stride=2, padding=1)
    if kind == "up_conv":
        h = F.interpolate(h, scale_factor=2, mode="nearest")
        return F.conv2d(h, sd[f"{p}.conv.weight"], sd[f"{p}.conv.bias"], padding=1)
    raise ValueError(kind)


def adm_forward(sd: dict[str, Tensor], cfg: dict, x: Tensor, timesteps: Tensor,
                middle_out: list[Tensor] | None = None) -> Tensor:
    """ADM's output for images ``x`` at integer ``timesteps`` (one per image); the middle block's output (h) is
    appended to ``middle_out`` when given."""
    emb = timestep_embedding(timesteps, cfg["num_channels"])
    emb = F.linear(emb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])
    emb = F.linear(F.silu(emb), sd["time_embed.2.weight"], sd["time_embed.2.bias"])
    inputs, middle, outputs = adm_layout(cfg)
    skips = []
    h = x
    for i, block in enumerate(inputs):
        for j, (kind, _, _) in enumerate(block):
            h = _layer(kind, h, emb, sd, f"input_blocks.{i}.{j}", cfg)
        skips.append(h)
    for j, (kind, _, _) in enumerate(middle):
        h = _layer(kind, h, emb, sd, f"middle_block.{j}", cfg)
    if middle_out is not None:
        middle_out.append(h)
    for i, block in enumerate(outputs):
        h = torch.cat([h, skips.pop()], dim=1)
        for j, (kind, _, _) in enumerate(block):
            h = _layer(kind, h, emb, sd, f"output_blocks.{i}.{j}", cfg)
    h = F.silu(_norm(h, sd, "out.0"))
    return F.conv2d(h, sd["out.2.weight"], sd["out.2.bias"], padding=1)
