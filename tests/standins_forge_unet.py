"""A toy UNet with new Forge's module layout and forward, written from ``backend/nn/unet.py`` (``dfdcbab6``):

- ``TimestepEmbedSequential.forward(x, emb, context, transformer_options, output_shape)`` with the
  ``block_inner_modifiers`` before/after each layer, ``transformer_index`` counted per SpatialTransformer;
- ``SpatialTransformer`` setting ``block_index`` per transformer; ``BasicTransformerBlock._forward`` with the
  extra options (every option but the patches, plus ``n_heads``/``dim_head``) and the ``attn1`` replace-patch
  lookup ``(part, id, block_index)`` then ``(part, id)``; ``Upsample`` sized by ``output_shape``;
- ``IntegratedUNet2DConditionModel.forward``: ``original_shape``, ``transformer_index``, ``block`` per block,
  ``block_modifiers``, ``apply_control`` (popping residual lists, in place), ``input_block_patch``,
  ``input_block_patch_after_skip``, ``output_block_patch``, ``group_norm_wrapper`` on the final norm.

The same widths, depths and blocks as ``tests.standins.TinyUNet``, so the layer selections mean the same.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tests.standins import CONTEXT, WIDTH, CrossAttention, ToyParts, add_toy_blocks, sharpen_self_attention


def apply_control(h, control, name):
    if control is not None and name in control and len(control[name]) > 0:
        ctrl = control[name].pop()
        if ctrl is not None:
            h += ctrl
    return h


def timestep_embedding(timesteps, dim, max_period=10000, repeat_only=False):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepBlock(nn.Module):
    pass


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    def forward(self, x, emb, context=None, transformer_options={}, output_shape=None):  # noqa: B006 (the host's)
        block_inner_modifiers = transformer_options.get("block_inner_modifiers", [])
        for layer_index, layer in enumerate(self):
            for modifier in block_inner_modifiers:
                x = modifier(x, "before", layer, layer_index, self, transformer_options)
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb, transformer_options)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, transformer_options)
                if "transformer_index" in transformer_options:
                    transformer_options["transformer_index"] += 1
            elif isinstance(layer, Upsample):
                x = layer(x, output_shape=output_shape)
            else:
                x = layer(x)
            for modifier in block_inner_modifiers:
                x = modifier(x, "after", layer, layer_index, self, transformer_options)
        return x


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.n_heads, self.d_head = heads, dim // heads
        self.attn1 = CrossAttention(dim, heads=heads)
        self.attn2 = CrossAttention(dim, CONTEXT, heads=heads)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context=None, transformer_options={}):  # noqa: B006
        extra_options = {}
        block = transformer_options.get("block", None)
        block_index = transformer_options.get("block_index", 0)
        replace = {}
        for k in transformer_options:
            if k == "patches_replace":
                replace = transformer_options[k]
            elif k != "patches":
                extra_options[k] = transformer_options[k]
        extra_options["n_heads"] = self.n_heads
        extra_options["dim_head"] = self.d_head
        n = self.norm1(x)
        transformer_block = None if block is None else (block[0], block[1], block_index)
        attn1_replace = replace.get("attn1", {})
        key = transformer_block if transformer_block in attn1_replace else block
        if key in attn1_replace:
            q, k, v = self.attn1.to_q(n), self.attn1.to_k(n), self.attn1.to_v(n)
            n = self.attn1.to_out(attn1_replace[key](q, k, v, extra_options))
        else:
            n = self.attn1(n)
        x = x + n
        return x + self.attn2(self.norm2(x), context=context)


class SpatialTransformer(nn.Module):
    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(dim) for _ in range(depth))

    def forward(self, x, context=None, transformer_options={}):  # noqa: B006
        b, c, h, w = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # 'b c h w -> b (h w) c'
        for i, block in enumerate(self.transformer_blocks):
            transformer_options["block_index"] = i
            tokens = block(tokens, context=context, transformer_options=transformer_options)
        return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2) + x


class ResBlock(TimestepBlock):
    def __init__(self, channels_in: int, channels_out: int = WIDTH) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels_in, channels_out, 3, padding=1)

    def forward(self, x, emb, transformer_options={}):  # noqa: B006
        return torch.tanh(self.conv(x) + emb[:, : self.conv.out_channels, None, None])


class Downsample(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.op = nn.Conv2d(WIDTH, WIDTH, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(WIDTH, WIDTH, 3, padding=1)

    def forward(self, x, output_shape=None):
        shape = [x.shape[2] * 2, x.shape[3] * 2] if output_shape is None else [output_shape[2], output_shape[3]]
        return self.conv(F.interpolate(x, size=shape, mode="nearest"))


class IntegratedUNet2DConditionModel(nn.Module):
    """Depths: input 1 (depth 0), input 3 (depth 1), middle (depth 2), output 0 (2), 2 (1), 4 (0)."""

    def __init__(self, in_channels: int = 4, depth: int = 2, adm_in: int | None = None) -> None:
        super().__init__()
        self.model_channels = WIDTH
        self.time_embed = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.SiLU(), nn.Linear(WIDTH, WIDTH))
        self.num_classes = None if adm_in is None else "sequential"
        if adm_in is not None:
            self.label_emb = nn.Sequential(nn.Linear(adm_in, WIDTH))
        parts = ToyParts(TimestepEmbedSequential, ResBlock, SpatialTransformer, Downsample, Upsample)
        add_toy_blocks(self, parts, in_channels, depth)
        self.out = nn.Sequential(nn.GroupNorm(2, WIDTH), nn.SiLU(), nn.Conv2d(WIDTH, 4, 3, padding=1))
        sharpen_self_attention(self, BasicTransformerBlock)

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        transformer_options["original_shape"] = list(x.shape)
        transformer_options["transformer_index"] = 0
        transformer_patches = transformer_options.get("patches", {})
        block_modifiers = transformer_options.get("block_modifiers", [])
        assert (y is not None) == (self.num_classes is not None)
        hs = []
        t_emb = timestep_embedding(timesteps, self.model_channels, repeat_only=False).to(x.dtype)
        emb = self.time_embed(t_emb)
        if self.num_classes is not None:
            assert y.shape[0] == x.shape[0]
            emb = emb + self.label_emb(y)
        h = x
        for id, module in enumerate(self.input_blocks):
            transformer_options["block"] = ("input", id)
            for block_modifier in block_modifiers:
                h = block_modifier(h, "before", transformer_options)
            h = module(h, emb, context, transformer_options)
            h = apply_control(h, control, "input")
            for block_modifier in block_modifiers:
                h = block_modifier(h, "after", transformer_options)
            for p in transformer_patches.get("input_block_patch", []):
                h = p(h, transformer_options)
            hs.append(h)
            for p in transformer_patches.get("input_block_patch_after_skip", []):
                h = p(h, transformer_options)
        transformer_options["block"] = ("middle", 0)
        for block_modifier in block_modifiers:
            h = block_modifier(h, "before", transformer_options)
        h = self.middle_block(h, emb, context, transformer_options)
        h = apply_control(h, control, "middle")
        for block_modifier in block_modifiers:
            h = block_modifier(h, "after", transformer_options)
        for id, module in enumerate(self.output_blocks):
            transformer_options["block"] = ("output", id)
            hsp = hs.pop()
            hsp = apply_control(hsp, control, "output")
            for p in transformer_patches.get("output_block_patch", []):
                h, hsp = p(h, hsp, transformer_options)
            h = torch.cat([h, hsp], dim=1)
            del hsp
            output_shape = hs[-1].shape if len(hs) > 0 else None
            for block_modifier in block_modifiers:
                h = block_modifier(h, "before", transformer_options)
            h = module(h, emb, context, transformer_options, output_shape)
            for block_modifier in block_modifiers:
                h = block_modifier(h, "after", transformer_options)
        transformer_options["block"] = ("last", 0)
        for block_modifier in block_modifiers:
            h = block_modifier(h, "before", transformer_options)
        if "group_norm_wrapper" in transformer_options:
            out_norm, out_rest = self.out[0], self.out[1:]
            h = transformer_options["group_norm_wrapper"](out_norm, h, transformer_options)
            h = out_rest(h)
        else:
            h = self.out(h)
        for block_modifier in block_modifiers:
            h = block_modifier(h, "after", transformer_options)
        return h.type(x.dtype)
