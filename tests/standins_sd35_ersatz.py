"""ersatzForge's SD3.5 (``backend/nn/mmditx.py``, ``fca12a2``) where it differs from Forge main's: the joint
q/k/v live in module-level buffers (``SD3_Q``, ``SD3_K``, ``SD3_V``, ``SD3_t``) that the model's forward
allocates for its batch (``global``), ``block_mixing`` writes the context's and the image's projections into
them and calls ``attention_function(q, k, v, heads)`` on ``[B, L, heads * D]``. The blocks and layers are
``standins_sd35``'s."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests import standins_sd35
from tests.standins_sd35 import HEADS, WIDTH

SD3_Q = None
SD3_K = None
SD3_V = None
SD3_t = None


def attention_function(q, k, v, heads, mask=None, skip_reshape=False):
    b, _, dim = q.shape
    q, k, v = (t.view(b, -1, heads, dim // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, -1, dim)


def block_mixing(context, x, context_block, x_block, c):
    global SD3_Q, SD3_K, SD3_V, SD3_t
    context_qkv, _, context_rest = context_block.pre(context, c)
    x_qkv, x_qkv2, x_rest = x_block.pre(x, c)
    for buffer, index in ((SD3_Q, 0), (SD3_K, 1), (SD3_V, 2)):
        buffer[:, :SD3_t] = context_qkv[index]
        buffer[:, SD3_t:] = x_qkv[index]
    attn = attention_function(SD3_Q, SD3_K, SD3_V, HEADS)
    context_attn, x_attn = attn[:, :SD3_t], attn[:, SD3_t:]
    context = None if context_block.pre_only else context_block.post(context_attn, None, *context_rest)
    attn2 = attention_function(*x_qkv2, HEADS) if x_qkv2 is not None else None
    return context, x_block.post(x_attn, attn2, *x_rest)


class JointBlock(standins_sd35.JointBlock):
    def forward(self, *args, **kwargs):
        return block_mixing(*args, context_block=self.context_block, x_block=self.x_block, **kwargs)


class MMDiTX(standins_sd35.MMDiTX):
    def __init__(self, depth=4, self_attn_blocks=2):
        super().__init__(depth, self_attn_blocks)
        self.joint_blocks = torch.nn.ModuleList(
            JointBlock(pre_only=i == depth - 1, self_attn=i < self_attn_blocks) for i in range(depth)
        )

    def forward(self, x, t, y=None, context=None, control=None, transformer_options=None, **kwargs):
        global SD3_Q, SD3_K, SD3_V, SD3_t
        SD3_t = context.shape[1]
        tokens = SD3_t + (x.shape[-2] // 2) * (x.shape[-1] // 2)
        SD3_Q, SD3_K, SD3_V = (torch.empty(x.shape[0], tokens, WIDTH, dtype=x.dtype) for _ in range(3))
        return super().forward(x, t, y, context, control, transformer_options, **kwargs)
