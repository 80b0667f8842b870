"""Small Lumina 2 / Z-Image models with the layouts of two hosts, written from their source at small width in
float64 (``pad_tokens_multiple`` 8 instead of 32, two heads of width 8):

- ``Lumina2DiT``: ersatzForge ``backend/nn/lumina2.py`` (``fca12a2``). ``JointAttention.forward`` applies
  ``q_norm``, RoPE and the k/v head repeat, then the module-level ``attention_function(q, k, v, heads, None,
  skip_reshape=True)`` on ``[B, heads, L, D]``; the blocks add in place (``x.add_``) and take ``negpip``
  (the first row's caption-token weights, scaling the caption values) and Z-Image control hints (a tuple of
  per-row tensors made from the module-global ``shared.ZITlatent`` by the control layers); the caption is
  zero-padded to the multiple before ``cap_embedder``; ``unpatchify(x, [h, w], num_tokens)``.
- ``NextDiT``: Forge Neo ``backend/nn/lumina.py`` (``e75b242``). The kernel call passes the mask
  positionally and ``transformer_options`` by keyword; ``cap_pad_token`` is appended after ``cap_embedder``;
  the context refiner takes the caption mask (``attention_mask``); ``unpatchify`` takes per-row lists
  (``img_size``, ``cap_size``) built for the call's rows.

Both: the latent padded (circular) to even sides and cut in 2x2 patches row-major; caption ids (i + 1, 0, 0),
image ids (caption length + 1, row, column), zero ids for the pad tokens; the joint sequence of the main
``layers`` is caption, image, image pad tokens. ``z_image`` picks Z-Image's modulation (no SiLU before the
adaLN Linear, timestep scaled by 1000, k/v heads = heads) over Lumina 2's (SiLU first, grouped k/v heads).
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

HEADS, HEAD_DIM = 2, 8
WIDTH = HEADS * HEAD_DIM
CAPTION = 12  # caption feature width (cap_feat_dim)
CHANNELS = 4  # latent channels (16 in the real models)
PATCH = 2
AXES = (2, 2, 4)  # RoPE widths of the three position axes (sum = HEAD_DIM)
FREQ = 8  # timestep frequency embedding width

shared = SimpleNamespace(ZITlatent=None, ZITstrength=0.0, ZITstop=0.0)  # ersatzForge's modules.shared fields


def attention_function(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, **kwargs):
    if not skip_reshape:
        b, _, c = q.shape
        q, k, v = (t.view(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    b, _, _, d = q.shape
    if mask is not None and mask.ndim == 2:
        mask = mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, -1, heads * d)


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def rope_ids(ids):
    """``EmbedND`` then ``movedim(1, 2)``: rotation matrices [B, L, 1, HEAD_DIM / 2, 2, 2] from [B, L, 3] ids."""
    parts = []
    for axis, dim in enumerate(AXES):
        omega = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        angle = ids[..., axis].unsqueeze(-1) * omega
        parts.append(torch.stack([angle.cos(), -angle.sin(), angle.sin(), angle.cos()], -1).unflatten(-1, (2, 2)))
    return torch.cat(parts, dim=-3).unsqueeze(2)


def apply_rotary(x, freqs):
    pairs = x.reshape(*x.shape[:-1], -1, 1, 2)
    return (freqs[..., 0] * pairs[..., 0] + freqs[..., 1] * pairs[..., 1]).reshape(*x.shape)


class JointAttention(nn.Module):
    """ersatzForge's: ``forward(x, x_mask, freqs_cis, negpip)``, the kernel gets ``None`` as its mask."""

    def __init__(self, kv_heads):
        super().__init__()
        self.kv_heads = kv_heads
        self.qkv = nn.Linear(WIDTH, (HEADS + 2 * kv_heads) * HEAD_DIM, bias=False)
        self.out = nn.Linear(WIDTH, WIDTH, bias=False)
        self.q_norm, self.k_norm = RMSNorm(HEAD_DIM), RMSNorm(HEAD_DIM)

    def project(self, x, freqs_cis):
        b, n, _ = x.shape
        q, k, v = torch.split(self.qkv(x), [HEADS * HEAD_DIM, self.kv_heads * HEAD_DIM, self.kv_heads * HEAD_DIM], -1)
        q = apply_rotary(self.q_norm(q.view(b, n, HEADS, HEAD_DIM)), freqs_cis)
        k = apply_rotary(self.k_norm(k.view(b, n, self.kv_heads, HEAD_DIM)), freqs_cis)
        return q, k, v.view(b, n, self.kv_heads, HEAD_DIM)

    @staticmethod
    def repeat(k, v):
        rep = HEADS // k.shape[2]
        return tuple(t.unsqueeze(3).repeat(1, 1, 1, rep, 1).flatten(2, 3) for t in (k, v))

    def forward(self, x, x_mask, freqs_cis, negpip=None):
        q, k, v = self.project(x, freqs_cis)
        if negpip is not None:
            v[:, : len(negpip)] *= negpip[:, None, None]
        k, v = self.repeat(k, v)
        out = attention_function(q.movedim(1, 2), k.movedim(1, 2), v.movedim(1, 2), HEADS, None, skip_reshape=True)
        return self.out(out)


class NeoJointAttention(JointAttention):
    """Forge Neo's: ``forward(x, x_mask, freqs_cis, transformer_options={})``, the mask passed on."""

    def forward(self, x, x_mask, freqs_cis, transformer_options={}):  # noqa: B006 (the host's signature)
        q, k, v = self.project(x, freqs_cis)
        k, v = self.repeat(k, v)
        q, k, v = q.movedim(1, 2), k.movedim(1, 2), v.movedim(1, 2)
        return self.out(
            attention_function(q, k, v, HEADS, x_mask, skip_reshape=True, transformer_options=transformer_options)
        )


class FeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1, self.w3 = nn.Linear(WIDTH, 2 * WIDTH, bias=False), nn.Linear(WIDTH, 2 * WIDTH, bias=False)
        self.w2 = nn.Linear(2 * WIDTH, WIDTH, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _modulation(z_image):
    if z_image:
        return nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH))
    return nn.Sequential(nn.SiLU(), nn.Linear(WIDTH, 4 * WIDTH))


class JointTransformerBlock(nn.Module):
    """ersatzForge's block: in-place residuals, ``negpip`` passed to the attention, control hints added to the
    last tokens (image and pad) of the blocks that have a ``block_id``."""

    def __init__(self, kv_heads, modulation=True, z_image=False, block_id=None):
        super().__init__()
        self.attention = JointAttention(kv_heads)
        self.feed_forward = FeedForward()
        self.attention_norm1, self.attention_norm2 = RMSNorm(WIDTH), RMSNorm(WIDTH)
        self.ffn_norm1, self.ffn_norm2 = RMSNorm(WIDTH), RMSNorm(WIDTH)
        self.modulation = modulation
        self.block_id = block_id
        if modulation:
            self.adaLN_modulation = _modulation(z_image)

    def forward(self, x, x_mask, freqs_cis, adaln_input=None, negpip=None, control=None, strength=None):
        if self.modulation:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln_input).chunk(4, dim=1)
            attn_in = self.attention_norm1(x).mul_(scale_msa.add_(1.0).unsqueeze(1))
            x.add_(
                gate_msa.unsqueeze(1).tanh() * self.attention_norm2(self.attention(attn_in, x_mask, freqs_cis, negpip))
            )
            ffn_in = self.ffn_norm1(x).mul_(scale_mlp.add_(1.0).unsqueeze(1))
            x.add_(gate_mlp.unsqueeze(1).tanh() * self.ffn_norm2(self.feed_forward(ffn_in)))
        else:
            x.add_(self.attention_norm2(self.attention(self.attention_norm1(x), x_mask, freqs_cis, negpip)))
            x.add_(self.ffn_norm2(self.feed_forward(self.ffn_norm1(x))))
        if self.block_id is not None and control is not None and strength is not None:
            size = control[self.block_id].shape[1]
            x[:, -size:] += control[self.block_id] * strength
        return x


class ControlBlock(JointTransformerBlock):
    """``JointTransformerBlockControl``: hint ``block_id`` from the control tokens and the image tokens."""

    def __init__(self, kv_heads, z_image, block_id):
        super().__init__(kv_heads, z_image=z_image)
        self.block_id = block_id
        if block_id == 0:
            self.before_proj = nn.Linear(WIDTH, WIDTH)
        self.after_proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, c, x, x_mask, freqs_cis, adaln_input=None):
        if self.block_id == 0:
            c, hints = self.before_proj(c) + x, []
        else:
            hints = list(torch.unbind(c))
            c = hints.pop(-1)
        c = super().forward(c, x_mask, freqs_cis, adaln_input)
        return torch.stack([*hints, self.after_proj(c), c])


class NeoJointTransformerBlock(nn.Module):
    """Forge Neo's block: ``forward(x, x_mask, freqs_cis, adaln_input=None, transformer_options={})``."""

    def __init__(self, kv_heads, modulation=True, z_image=False):
        super().__init__()
        self.attention = NeoJointAttention(kv_heads)
        self.feed_forward = FeedForward()
        self.attention_norm1, self.attention_norm2 = RMSNorm(WIDTH), RMSNorm(WIDTH)
        self.ffn_norm1, self.ffn_norm2 = RMSNorm(WIDTH), RMSNorm(WIDTH)
        self.modulation = modulation
        if modulation:
            self.adaLN_modulation = _modulation(z_image)

    def forward(self, x, x_mask, freqs_cis, adaln_input=None, transformer_options={}):  # noqa: B006
        options = {"transformer_options": transformer_options}
        if self.modulation:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln_input).chunk(4, dim=1)
            attn_in = self.attention_norm1(x) * (1 + scale_msa.unsqueeze(1))
            x = x + gate_msa.unsqueeze(1).tanh() * self.attention_norm2(
                self.attention(attn_in, x_mask, freqs_cis, **options)
            )
            ffn_in = self.ffn_norm1(x) * (1 + scale_mlp.unsqueeze(1))
            return x + gate_mlp.unsqueeze(1).tanh() * self.ffn_norm2(self.feed_forward(ffn_in))
        x = x + self.attention_norm2(self.attention(self.attention_norm1(x), x_mask, freqs_cis, **options))
        return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))


class FinalLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(WIDTH, PATCH * PATCH * CHANNELS)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(WIDTH, WIDTH))

    def forward(self, x, c):
        scale = self.adaLN_modulation(c)
        return self.linear(F.layer_norm(x, (WIDTH,)) * (1 + scale.unsqueeze(1)))


def timestep_embedding(t):
    half = FREQ // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _Base(nn.Module):
    """What both hosts' models hold: embedders, the two refiners, ``layers``, ``final_layer``, pad tokens."""

    block = JointTransformerBlock

    def __init__(self, layers=4, refiners=2, z_image=False, pad_tokens_multiple=None):
        super().__init__()
        kv_heads = HEADS if z_image else 1  # Lumina 2: grouped k/v heads (8 for 24), Z-Image: as many as q
        self.z_image = z_image
        self.patch_size = PATCH
        self.pad_tokens_multiple = pad_tokens_multiple
        self.x_embedder = nn.Linear(PATCH * PATCH * CHANNELS, WIDTH)
        self.t_embedder = nn.Sequential(nn.Linear(FREQ, WIDTH), nn.SiLU(), nn.Linear(WIDTH, WIDTH))
        self.cap_embedder = nn.Sequential(RMSNorm(CAPTION), nn.Linear(CAPTION, WIDTH))
        self.context_refiner = nn.ModuleList(self.block(kv_heads, modulation=False) for _ in range(refiners))
        self.noise_refiner = nn.ModuleList(self.block(kv_heads, z_image=z_image) for _ in range(refiners))
        self.layers = nn.ModuleList(self.make_layer(kv_heads, z_image, i) for i in range(layers))
        self.final_layer = FinalLayer()
        if pad_tokens_multiple is not None:
            self.x_pad_token = nn.Parameter(torch.randn(1, WIDTH))
            self.cap_pad_token = nn.Parameter(torch.randn(1, WIDTH))

    def make_layer(self, kv_heads, z_image, index):
        return self.block(kv_heads, z_image=z_image)

    def embed_image(self, x, num_tokens):
        b, c, h, w = x.shape
        tokens = x.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 3, 5, 1).flatten(3).flatten(1, 2)
        tokens = self.x_embedder(tokens)
        ids = torch.zeros(b, tokens.shape[1], 3, dtype=x.dtype)
        ids[..., 0] = num_tokens + 1
        ids[..., 1] = torch.arange(h // PATCH, dtype=x.dtype).repeat_interleave(w // PATCH)
        ids[..., 2] = torch.arange(w // PATCH, dtype=x.dtype).repeat(h // PATCH)
        if self.pad_tokens_multiple is not None:
            extra = (-tokens.shape[1]) % self.pad_tokens_multiple
            tokens = torch.cat([tokens, self.x_pad_token.to(tokens).unsqueeze(0).repeat(b, extra, 1)], dim=1)
            ids = F.pad(ids, (0, 0, 0, extra))
        return tokens, ids

    @staticmethod
    def caption_ids(b, num_tokens, dtype):
        ids = torch.zeros(b, num_tokens, 3, dtype=dtype)
        ids[..., 0] = torch.arange(num_tokens, dtype=dtype) + 1.0
        return ids

    @staticmethod
    def pad(x):
        return F.pad(x, (0, (-x.shape[-1]) % PATCH, 0, (-x.shape[-2]) % PATCH), mode="circular")


class Lumina2DiT(_Base):
    """ersatzForge's ``Lumina2DiT``; ``control=True`` adds Z-Image's control layers (hints for layers 0, 2)."""

    def __init__(self, layers=4, refiners=2, z_image=False, pad_tokens_multiple=None, control=False):
        self.control_places = (0, 2) if control else ()
        super().__init__(layers, refiners, z_image, pad_tokens_multiple)
        self.control = control
        if control:
            kv_heads = HEADS if z_image else 1
            self.control_x_embedder = nn.Linear(PATCH * PATCH * CHANNELS, WIDTH)
            self.control_layers = nn.ModuleList(ControlBlock(kv_heads, z_image, i) for i in range(2))

    def make_layer(self, kv_heads, z_image, index):
        place = self.control_places.index(index) if index in self.control_places else None
        return JointTransformerBlock(kv_heads, z_image=z_image, block_id=place)

    def unpatchify(self, x, img_size, cap_size):
        h, w = img_size[0] // PATCH, img_size[1] // PATCH  # the unpadded sides, as the host passes them
        x = x[:, cap_size : cap_size + h * w]
        return (
            x.unflatten(1, (h, w))
            .unflatten(-1, (PATCH, PATCH, CHANNELS))
            .permute(0, 5, 1, 3, 2, 4)
            .flatten(4, 5)
            .flatten(2, 3)
        )

    def patchify_and_embed(self, x, context, control, t, num_tokens):
        x, image_ids = self.embed_image(x, num_tokens)
        freqs_cis = rope_ids(torch.cat([self.caption_ids(x.shape[0], num_tokens, x.dtype), image_ids], dim=1))
        if control is not None:
            control = self.control_x_embedder(control)
            if self.pad_tokens_multiple is not None:
                extra = x.shape[1] - control.shape[1]
                control = torch.cat([control, self.x_pad_token.to(x).unsqueeze(0).repeat(x.shape[0], extra, 1)], 1)
            for layer in self.control_layers:
                control = layer(control, x, None, freqs_cis[:, num_tokens:], t)
            control = torch.unbind(control)[:-1]
        for layer in self.noise_refiner:
            x = layer(x, None, freqs_cis[:, num_tokens:], t, None, control, strength=1.0)
        for layer in self.context_refiner:
            context = layer(context, None, freqs_cis[:, :num_tokens])
        return torch.cat((context, x), dim=1), control, freqs_cis

    def forward(self, x, timesteps, context, negpip=None, num_tokens=None, attention_mask=None, **kwargs):
        t = 1.0 - timesteps
        bs, _, h, w = x.shape
        x = self.pad(x)
        control, strength = None, 0.0
        if self.control and shared.ZITlatent is not None and shared.ZITstrength != 0.0:
            control, strength = shared.ZITlatent, shared.ZITstrength
            if bs > 1:
                control = control.repeat(bs, 1, 1)
        adaln_input = self.t_embedder(timestep_embedding(t * 1000.0 if self.z_image else t))
        if self.pad_tokens_multiple is not None:
            extra = (-context.shape[1]) % self.pad_tokens_multiple
            context = torch.cat([context, context.new_zeros([bs, extra, context.shape[2]])], dim=1)
        context = self.cap_embedder(context)
        num_tokens = context.shape[1]
        x, control, freqs_cis = self.patchify_and_embed(x, context, control, adaln_input, num_tokens)
        if negpip is not None:
            negpip = negpip[0]
        for layer in self.layers:
            x = layer(x, None, freqs_cis, adaln_input, negpip, control, strength)
        x = self.final_layer(x, adaln_input)
        return -self.unpatchify(x, [h, w], num_tokens)[:, :, :h, :w]


class NextDiT(_Base):
    """Forge Neo's ``NextDiT``."""

    block = NeoJointTransformerBlock

    def unpatchify(self, x, img_size, cap_size, return_tensor=False):
        images = []
        for i in range(x.size(0)):  # one entry of img_size and cap_size per row of the call
            h, w = img_size[i][0] // PATCH, img_size[i][1] // PATCH
            rows = x[i][cap_size[i] : cap_size[i] + h * w]
            images.append(rows.view(h, w, PATCH, PATCH, CHANNELS).permute(4, 0, 2, 1, 3).flatten(3, 4).flatten(1, 2))
        return torch.stack(images) if return_tensor else images

    def patchify_and_embed(self, x, cap_feats, cap_mask, t, transformer_options):
        bsz = x.shape[0]
        if self.pad_tokens_multiple is not None:
            extra = (-cap_feats.shape[1]) % self.pad_tokens_multiple
            pad = self.cap_pad_token.to(cap_feats).unsqueeze(0).repeat(bsz, extra, 1)
            cap_feats = torch.cat((cap_feats, pad), dim=1)
            if cap_mask is not None:
                cap_mask = F.pad(cap_mask, (0, extra))
        num_tokens = cap_feats.shape[1]
        _, _, h, w = x.shape
        x, image_ids = self.embed_image(x, num_tokens)
        freqs_cis = rope_ids(torch.cat([self.caption_ids(bsz, num_tokens, x.dtype), image_ids], dim=1))
        options = {"transformer_options": transformer_options}
        for layer in self.context_refiner:
            cap_feats = layer(cap_feats, cap_mask, freqs_cis[:, :num_tokens], **options)
        for layer in self.noise_refiner:
            x = layer(x, None, freqs_cis[:, num_tokens:], t, **options)
        return torch.cat((cap_feats, x), dim=1), None, [(h, w)] * bsz, [num_tokens] * bsz, freqs_cis

    def forward(self, x, timesteps, context, num_tokens=None, attention_mask=None, **kwargs):
        t = 1.0 - timesteps
        _, _, h, w = x.shape
        x = self.pad(x)
        adaln_input = self.t_embedder(timestep_embedding(t * (1000.0 if self.z_image else 1.0)))
        cap_feats = self.cap_embedder(context)
        transformer_options = kwargs.get("transformer_options", {})
        x, mask, img_size, cap_size, freqs_cis = self.patchify_and_embed(
            x, cap_feats, attention_mask, adaln_input, transformer_options
        )
        for layer in self.layers:
            x = layer(x, mask, freqs_cis, adaln_input, transformer_options=transformer_options)
        x = self.final_layer(x, adaln_input)
        return -self.unpatchify(x, img_size, cap_size, return_tensor=True)[:, :, :h, :w]
