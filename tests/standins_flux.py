"""A small Flux and Chroma with Forge main's layout (``backend/nn/flux.py``, ``backend/nn/chroma.py``,
``dfdcbab6``), written from that source at small width in float64:

- module-level ``attention(q, k, v, pe)``: RoPE on q and k (``apply_rope``), then
  ``attention_function(q, k, v, heads, skip_reshape=True)`` on ``[B, heads, L, D]``, returning ``[B, L, C]``;
- double blocks: image and text q/k/v, each with its RMS q/k norm, joined text first; single blocks: one
  sequence (text then image) with a fused qkv+mlp projection; blocks get ``img``/``txt``/``vec``/``pe`` as
  keywords (single: ``img`` positional), as the model's loops call them;
- the forward pads the latent to even sides, cuts 2x2 patches, position ids (0, row, column) for the image
  and zeros for the text, and cuts the output back to the latent's size;
- Chroma: per-block modulations from an approximator, handed to each block as ``ModulationOut`` dataclasses
  (lists of them for the double blocks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

HEADS, HEAD_DIM = 2, 8
WIDTH = HEADS * HEAD_DIM
CONTEXT = 12  # text feature width
VEC = 6  # pooled text width
CHANNELS = 4  # latent channels (16 in the real model)


def attention_function(q, k, v, heads, mask=None, skip_reshape=False):
    if not skip_reshape:
        b, _, c = q.shape
        q, k, v = (t.view(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    b, _, _, d = q.shape
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, -1, heads * d)


def rope(pos, dim, theta):
    scale = torch.arange(0, dim, 2, dtype=torch.float64) / dim
    omega = 1.0 / (theta**scale)
    out = pos.unsqueeze(-1) * omega.unsqueeze(0)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    b, n, d, _ = out.shape
    return out.view(b, n, d, 2, 2)


def apply_rope(xq, xk, freqs_cis):
    xq_ = xq.reshape(*xq.shape[:-1], -1, 1, 2)
    xk_ = xk.reshape(*xk.shape[:-1], -1, 1, 2)
    xq_out = freqs_cis[..., 0] * xq_[..., 0] + freqs_cis[..., 1] * xq_[..., 1]
    xk_out = freqs_cis[..., 0] * xk_[..., 0] + freqs_cis[..., 1] * xk_[..., 1]
    return xq_out.reshape(*xq.shape), xk_out.reshape(*xk.shape)


def attention(q, k, v, pe):
    q, k = apply_rope(q, k, pe)
    return attention_function(q, k, v, q.shape[1], skip_reshape=True)


def timestep_embedding(t, dim, max_period=10000, time_factor=1000.0):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    args = (time_factor * t)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class EmbedND(nn.Module):
    def __init__(self, axes_dim):
        super().__init__()
        self.axes_dim = axes_dim

    def forward(self, ids):
        emb = torch.cat([rope(ids[..., i], self.axes_dim[i], 10000) for i in range(ids.shape[-1])], dim=-3)
        return emb.unsqueeze(1)


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.q_scale = nn.Parameter(torch.rand(dim) + 0.5)
        self.k_scale = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, q, k):
        def norm(x, scale):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * scale

        return norm(q, self.q_scale), norm(k, self.k_scale)


def _split(qkv):
    b, n, _ = qkv.shape
    return qkv.view(b, n, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)


class DoubleStreamBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.img_mod, self.txt_mod = nn.Linear(WIDTH, 6 * WIDTH), nn.Linear(WIDTH, 6 * WIDTH)
        self.img_qkv, self.txt_qkv = nn.Linear(WIDTH, 3 * WIDTH), nn.Linear(WIDTH, 3 * WIDTH)
        self.img_norm, self.txt_norm = QKNorm(HEAD_DIM), QKNorm(HEAD_DIM)
        self.img_proj, self.txt_proj = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)
        self.img_mlp, self.txt_mlp = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)

    def modulations(self, vec):
        return self.img_mod(F.silu(vec))[:, None].chunk(6, -1), self.txt_mod(F.silu(vec))[:, None].chunk(6, -1)

    def forward(self, img, txt, vec, pe):
        return self.run(img, txt, *self.modulations(vec), pe)

    def run(self, img, txt, img_mod, txt_mod, pe):
        img_q, img_k, img_v = _split(self.img_qkv((1 + img_mod[1]) * F.layer_norm(img, (WIDTH,)) + img_mod[0]))
        img_q, img_k = self.img_norm(img_q, img_k)
        txt_q, txt_k, txt_v = _split(self.txt_qkv((1 + txt_mod[1]) * F.layer_norm(txt, (WIDTH,)) + txt_mod[0]))
        txt_q, txt_k = self.txt_norm(txt_q, txt_k)
        q, k, v = torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2), torch.cat((txt_v, img_v), 2)
        attn = attention(q, k, v, pe=pe)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]
        img = img + img_mod[2] * self.img_proj(img_attn)
        img = img + img_mod[5] * self.img_mlp((1 + img_mod[4]) * F.layer_norm(img, (WIDTH,)) + img_mod[3])
        txt = txt + txt_mod[2] * self.txt_proj(txt_attn)
        txt = txt + txt_mod[5] * self.txt_mlp((1 + txt_mod[4]) * F.layer_norm(txt, (WIDTH,)) + txt_mod[3])
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.modulation = nn.Linear(WIDTH, 3 * WIDTH)
        self.linear1 = nn.Linear(WIDTH, 3 * WIDTH + 2 * WIDTH)
        self.linear2 = nn.Linear(3 * WIDTH, WIDTH)
        self.norm = QKNorm(HEAD_DIM)

    def forward(self, x, vec, pe):
        return self.run(x, self.modulation(F.silu(vec))[:, None].chunk(3, -1), pe)

    def run(self, x, mod, pe):
        qkv, mlp = torch.split(
            self.linear1((1 + mod[1]) * F.layer_norm(x, (WIDTH,)) + mod[0]), [3 * WIDTH, 2 * WIDTH], -1
        )
        q, k, v = _split(qkv)
        q, k = self.norm(q, k)
        attn = attention(q, k, v, pe=pe)
        return x + mod[2] * self.linear2(torch.cat((attn, F.gelu(mlp)), 2))


class LastLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.modulation = nn.Linear(WIDTH, 2 * WIDTH)
        self.linear = nn.Linear(WIDTH, 4 * CHANNELS)

    def forward(self, x, vec):
        shift, scale = self.modulation(F.silu(vec)).chunk(2, dim=1)
        return self.linear((1 + scale[:, None]) * F.layer_norm(x, (WIDTH,)) + shift[:, None])


def _patchify(x):
    bs, c, h, w = x.shape
    x = F.pad(x, (0, w % 2, 0, h % 2), mode="circular")
    h_len, w_len = (h + 1) // 2, (w + 1) // 2
    img = x.view(bs, c, h_len, 2, w_len, 2).permute(0, 2, 4, 1, 3, 5).reshape(bs, h_len * w_len, c * 4)
    ids = torch.zeros(h_len, w_len, 3, dtype=x.dtype)
    ids[..., 1] += torch.arange(h_len, dtype=x.dtype)[:, None]
    ids[..., 2] += torch.arange(w_len, dtype=x.dtype)[None, :]
    return img, ids.reshape(1, h_len * w_len, 3).repeat(bs, 1, 1), h_len, w_len


def _unpatchify(out, h, w, h_len, w_len):
    bs = out.shape[0]
    out = (
        out.view(bs, h_len, w_len, CHANNELS, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(bs, CHANNELS, h_len * 2, w_len * 2)
    )
    return out[:, :, :h, :w]


class Flux(nn.Module):
    """``IntegratedFluxTransformer2DModel``'s attributes and loops."""

    def __init__(self, double=3, single=3, guidance_embed=True):
        super().__init__()
        self.guidance_embed = guidance_embed
        self.pe_embedder = EmbedND([2, 2, 4])
        self.img_in = nn.Linear(4 * CHANNELS, WIDTH)
        self.time_in = nn.Linear(16, WIDTH)
        self.guidance_in = nn.Linear(16, WIDTH) if guidance_embed else nn.Identity()
        self.vector_in = nn.Linear(VEC, WIDTH)
        self.txt_in = nn.Linear(CONTEXT, WIDTH)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock() for _ in range(double))
        self.single_blocks = nn.ModuleList(SingleStreamBlock() for _ in range(single))
        self.final_layer = LastLayer()

    def inner_forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 16))
        if self.guidance_embed:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 16))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)
        img = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            img = block(img, vec=vec, pe=pe)
        img = img[:, txt.shape[1] :, ...]
        return self.final_layer(img, vec)

    def forward(self, x, timestep, context, y, guidance=None, **kwargs):
        bs, _, h, w = x.shape
        img, img_ids, h_len, w_len = _patchify(x)
        txt_ids = torch.zeros((bs, context.shape[1], 3), dtype=x.dtype)
        out = self.inner_forward(img, img_ids, context, txt_ids, timestep, y, guidance)
        return _unpatchify(out, h, w, h_len, w_len)


@dataclass
class ModulationOut:
    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


class ChromaDoubleBlock(DoubleStreamBlock):
    def forward(self, img, txt, mod, pe):
        (img1, img2), (txt1, txt2) = mod
        img_mod = (img1.shift, img1.scale, img1.gate, img2.shift, img2.scale, img2.gate)
        txt_mod = (txt1.shift, txt1.scale, txt1.gate, txt2.shift, txt2.scale, txt2.gate)
        return self.run(img, txt, img_mod, txt_mod, pe)


class ChromaSingleBlock(SingleStreamBlock):
    def forward(self, x, mod, pe):
        return self.run(x, (mod.shift, mod.scale, mod.gate), pe)


class ChromaLastLayer(LastLayer):
    def forward(self, x, mod):
        shift, scale = mod
        return self.linear((1 + scale) * F.layer_norm(x, (WIDTH,)) + shift)


class Chroma(nn.Module):
    """``IntegratedChromaTransformer2DModel``'s attributes and loops: modulations from the approximator."""

    def __init__(self, double=3, single=3):
        super().__init__()
        self.pe_embedder = EmbedND([2, 2, 4])
        self.img_in = nn.Linear(4 * CHANNELS, WIDTH)
        self.txt_in = nn.Linear(CONTEXT, WIDTH)
        self.distilled_guidance_layer = nn.Linear(16 + 8, WIDTH)
        self.double_blocks = nn.ModuleList(ChromaDoubleBlock() for _ in range(double))
        self.single_blocks = nn.ModuleList(ChromaSingleBlock() for _ in range(single))
        self.final_layer = ChromaLastLayer()

    def forward(self, x, timestep, context, **kwargs):
        bs, _, h, w = x.shape
        img, img_ids, h_len, w_len = _patchify(x)
        txt_ids = torch.zeros((bs, context.shape[1], 3), dtype=x.dtype)
        img = self.img_in(img)
        count = len(self.double_blocks) * 12 + len(self.single_blocks) * 3 + 2
        index = timestep_embedding(torch.arange(count, dtype=x.dtype), 8).unsqueeze(0).repeat(bs, 1, 1)
        step = timestep_embedding(timestep, 16).unsqueeze(1).repeat(1, count, 1)
        mods = self.distilled_guidance_layer(torch.cat([step, index], -1))
        slots = iter(range(0, count, 3))

        def mod():
            i = next(slots)
            return ModulationOut(mods[:, i : i + 1], mods[:, i + 1 : i + 2], mods[:, i + 2 : i + 3])

        txt = self.txt_in(context)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, mod=[[mod(), mod()], [mod(), mod()]], pe=pe)
        img = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            img = block(img, mod=mod(), pe=pe)
        img = img[:, txt.shape[1] :, ...]
        out = self.final_layer(img, [mods[:, -2:-1], mods[:, -1:]])
        return _unpatchify(out, h, w, h_len, w_len)
