"""A small SD3.5 MMDiT(-X) with Forge main's layout (``backend/nn/mmditx.py``, ``dfdcbab6``), at small width
in float64: a module-level ``attention(q, k, v, heads, mask=None)`` on ``[B, L, heads * D]`` (torch SDPA);
``block_mixing(context, x, context_block, x_block, c)`` joining the context's and the image's q/k/v (each
after its ``ln_q``/``ln_k``), context first, and MMDiT-X's image-only second attention (``attn2``) in the
first blocks; ``joint_blocks`` called as ``block(context, x, c=c_mod)``; the last block's context is
``pre_only``; ``transformer_options['skip_layers']`` skips blocks; a stride-2 patch convolution (floor of
odd sides) and a ``final_layer(x, c)``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HEADS, HEAD_DIM = 2, 8
WIDTH = HEADS * HEAD_DIM
CONTEXT = 12
CHANNELS = 4


def attention(q, k, v, heads, mask=None):
    b, _, dim = q.shape
    q, k, v = (t.view(b, -1, heads, dim // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, -1, dim)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.ln_q = nn.LayerNorm(HEAD_DIM)
        self.ln_k = nn.LayerNorm(HEAD_DIM)
        self.proj = nn.Linear(WIDTH, WIDTH)

    def pre_attention(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, HEADS, HEAD_DIM).unbind(2)
        return self.ln_q(q).reshape(b, n, -1), self.ln_k(k).reshape(b, n, -1), v.reshape(b, n, -1)


class DismantledBlock(nn.Module):
    def __init__(self, pre_only=False, self_attn=False):
        super().__init__()
        self.pre_only, self.x_block_self_attn = pre_only, self_attn
        self.attn = Attention()
        self.attn2 = Attention() if self_attn else None
        self.mod = nn.Linear(WIDTH, 9 * WIDTH)
        self.mlp = nn.Linear(WIDTH, WIDTH)

    def pre(self, x, c):
        m = self.mod(F.silu(c)).chunk(9, dim=1)
        x_norm = F.layer_norm(x, (WIDTH,))
        qkv = self.attn.pre_attention(x_norm * (1 + m[1][:, None]) + m[0][:, None])
        qkv2 = self.attn2.pre_attention(x_norm * (1 + m[7][:, None]) + m[6][:, None]) if self.attn2 else None
        return qkv, qkv2, (x, m)

    def post(self, attn, attn2, x, m):
        x = x + m[2][:, None] * self.attn.proj(attn)
        if attn2 is not None:
            x = x + m[8][:, None] * self.attn2.proj(attn2)
        return x + m[5][:, None] * self.mlp(F.layer_norm(x, (WIDTH,)) * (1 + m[4][:, None]) + m[3][:, None])


def block_mixing(context, x, context_block, x_block, c):
    context_qkv, _, context_rest = context_block.pre(context, c)
    x_qkv, x_qkv2, x_rest = x_block.pre(x, c)
    q, k, v = (torch.cat((context_qkv[i], x_qkv[i]), dim=1) for i in range(3))
    attn = attention(q, k, v, HEADS)
    context_attn, x_attn = attn[:, : context_qkv[0].shape[1]], attn[:, context_qkv[0].shape[1] :]
    context = None if context_block.pre_only else context_block.post(context_attn, None, *context_rest)
    attn2 = attention(*x_qkv2, HEADS) if x_qkv2 is not None else None
    return context, x_block.post(x_attn, attn2, *x_rest)


class JointBlock(nn.Module):
    def __init__(self, pre_only=False, self_attn=False):
        super().__init__()
        self.context_block = DismantledBlock(pre_only=pre_only)
        self.x_block = DismantledBlock(self_attn=self_attn)

    def forward(self, *args, **kwargs):
        return block_mixing(*args, context_block=self.context_block, x_block=self.x_block, **kwargs)


class FinalLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.mod = nn.Linear(WIDTH, 2 * WIDTH)
        self.linear = nn.Linear(WIDTH, 4 * CHANNELS)

    def forward(self, x, c):
        shift, scale = self.mod(F.silu(c)).chunk(2, dim=1)
        return self.linear(F.layer_norm(x, (WIDTH,)) * (1 + scale[:, None]) + shift[:, None])


class MMDiTX(nn.Module):
    def __init__(self, depth=4, self_attn_blocks=2):
        super().__init__()
        self.x_embedder = nn.Conv2d(CHANNELS, WIDTH, 2, stride=2)
        self.pos_embed = nn.Parameter(torch.randn(1, 64, WIDTH))
        self.t_embedder = nn.Linear(1, WIDTH)
        self.y_embedder = nn.Linear(CONTEXT, WIDTH)
        self.context_embedder = nn.Linear(CONTEXT, WIDTH)
        self.joint_blocks = nn.ModuleList(
            JointBlock(pre_only=i == depth - 1, self_attn=i < self_attn_blocks) for i in range(depth)
        )
        self.final_layer = FinalLayer()

    def forward(self, x, t, y=None, context=None, control=None, transformer_options=None, **kwargs):
        h, w = x.shape[-2] // 2, x.shape[-1] // 2
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed[:, : h * w]
        c = self.t_embedder(t[:, None]) + self.y_embedder(y)
        context = self.context_embedder(context)
        skip_layers = (transformer_options or {}).get("skip_layers", [])
        for i, block in enumerate(self.joint_blocks):
            if i in skip_layers:
                continue
            context, x = block(context, x, c=c)
        x = self.final_layer(x, c)
        x = x.view(x.shape[0], h, w, 2, 2, CHANNELS).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(x.shape[0], CHANNELS, h * 2, w * 2)
