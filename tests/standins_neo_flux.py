"""Small Flux, Flux.2 and Chroma models with Forge Neo's layout (``backend/nn/flux.py``, a port of ComfyUI
v0.9.0, ``06d6af9``; Chroma as in the ComfyUI v0.10.0 port that takes its blocks from ``flux.py``), written
from that source at small width in float64. What differs from Forge main (``standins_flux``):

- ``attention(q, k, v, pe, mask=None, transformer_options={})`` applies RoPE (when ``pe`` is given) and calls
  ``attention_function(q, k, v, heads, skip_reshape=True, mask=mask, transformer_options=...)``: the mask
  and the options by keyword;
- the blocks take ``attn_mask`` and ``transformer_options`` by keyword and add their residuals in place
  (``img += ...``); the modulations are ``ModulationOut`` dataclasses from ``Modulation`` (Flux), from the
  model's global modulations (Flux.2: ``global_modulation``, the blocks' own ``modulation=False``) or from
  Chroma's approximator (``ChromaModulationOut``, a subclass);
- ``forward_orig`` writes ``block_index`` into ``transformer_options``, runs ``patches_replace["dit"]``
  block patches, and adds ControlNet residuals (``control["input"]`` / ``["output"]``) to the image tokens
  between the blocks;
- the latent is padded (circular) to whole patches of ``patch_size`` (2; Flux.2: 1, its latent is already
  patchified) and cut row-major; reference latents (Kontext, Flux.2 editing) come from the module-global
  ``dynamic_args["ref_latents"]`` and go after the image tokens; ``txt_ids_dims`` (Flux.2) number the text.
"""

# ruff: noqa: B006 (mutable defaults: the host's signatures, kept)

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tests.standins_flux import timestep_embedding  # the same in Neo's flux.py

HEADS, HEAD_DIM = 2, 8
WIDTH = HEADS * HEAD_DIM
CONTEXT = 12
VEC = 6
CHANNELS = 4

dynamic_args: dict = {"ref_latents": None}  # backend.args.dynamic_args


def attention_function(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, **kwargs):
    if not skip_reshape:
        b, _, c = q.shape
        q, k, v = (t.view(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v))
    b, _, _, d = q.shape
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, -1, heads * d)


def attention(q, k, v, pe, mask=None, transformer_options={}):
    if pe is not None:
        q, k = apply_rope(q, k, pe)
    return attention_function(
        q, k, v, q.shape[1], skip_reshape=True, mask=mask, transformer_options=transformer_options
    )


def rope(pos, dim, theta):
    omega = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    angle = pos.unsqueeze(-1) * omega
    return torch.stack([angle.cos(), -angle.sin(), angle.sin(), angle.cos()], dim=-1).unflatten(-1, (2, 2))


def apply_rope(xq, xk, freqs_cis):
    def one(x):
        pairs = x.reshape(*x.shape[:-1], -1, 1, 2)
        return (freqs_cis[..., 0] * pairs[..., 0] + freqs_cis[..., 1] * pairs[..., 1]).reshape(*x.shape)

    return one(xq), one(xk)


class EmbedND(nn.Module):
    def __init__(self, axes_dim):
        super().__init__()
        self.axes_dim = axes_dim

    def forward(self, ids):
        return torch.cat([rope(ids[..., i], d, 10000) for i, d in enumerate(self.axes_dim)], dim=-3).unsqueeze(1)


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.scale


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.query_norm, self.key_norm = RMSNorm(dim), RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.norm = QKNorm(HEAD_DIM)
        self.proj = nn.Linear(WIDTH, WIDTH)


@dataclass
class ModulationOut:
    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


class Modulation(nn.Module):
    def __init__(self, double):
        super().__init__()
        self.is_double, self.multiplier = double, 6 if double else 3
        self.lin = nn.Linear(WIDTH, self.multiplier * WIDTH)

    def forward(self, vec):
        if vec.ndim == 2:
            vec = vec[:, None, :]
        out = self.lin(F.silu(vec)).chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


def apply_mod(tensor, m_mult, m_add=None, modulation_dims=None):
    return torch.addcmul(m_add, tensor, m_mult) if m_add is not None else tensor * m_mult


def _split(qkv):
    return qkv.view(qkv.shape[0], qkv.shape[1], 3, HEADS, -1).permute(2, 0, 3, 1, 4)


class DoubleStreamBlock(nn.Module):
    def __init__(self, modulation=True):
        super().__init__()
        self.modulation = modulation
        if modulation:
            self.img_mod, self.txt_mod = Modulation(True), Modulation(True)
        self.img_attn, self.txt_attn = SelfAttention(), SelfAttention()
        self.img_mlp, self.txt_mlp = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)

    def forward(
        self,
        img,
        txt,
        vec,
        pe,
        attn_mask=None,
        modulation_dims_img=None,
        modulation_dims_txt=None,
        transformer_options={},
    ):
        if self.modulation:
            (img_mod1, img_mod2), (txt_mod1, txt_mod2) = self.img_mod(vec), self.txt_mod(vec)
        else:
            (img_mod1, img_mod2), (txt_mod1, txt_mod2) = vec
        img_q, img_k, img_v = _split(
            self.img_attn.qkv(apply_mod(F.layer_norm(img, (WIDTH,)), 1 + img_mod1.scale, img_mod1.shift))
        )
        img_q, img_k = self.img_attn.norm(img_q, img_k, img_v)
        txt_q, txt_k, txt_v = _split(
            self.txt_attn.qkv(apply_mod(F.layer_norm(txt, (WIDTH,)), 1 + txt_mod1.scale, txt_mod1.shift))
        )
        txt_q, txt_k = self.txt_attn.norm(txt_q, txt_k, txt_v)
        q, k, v = torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2), torch.cat((txt_v, img_v), 2)
        attn = attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]
        img += apply_mod(self.img_attn.proj(img_attn), img_mod1.gate)
        img += apply_mod(
            self.img_mlp(apply_mod(F.layer_norm(img, (WIDTH,)), 1 + img_mod2.scale, img_mod2.shift)), img_mod2.gate
        )
        txt += apply_mod(self.txt_attn.proj(txt_attn), txt_mod1.gate)
        txt += apply_mod(
            self.txt_mlp(apply_mod(F.layer_norm(txt, (WIDTH,)), 1 + txt_mod2.scale, txt_mod2.shift)), txt_mod2.gate
        )
        return img, txt


class SingleStreamBlock(nn.Module):
    def __init__(self, modulation=True):
        super().__init__()
        self.linear1 = nn.Linear(WIDTH, 3 * WIDTH + 2 * WIDTH)
        self.linear2 = nn.Linear(3 * WIDTH, WIDTH)
        self.norm = QKNorm(HEAD_DIM)
        self.modulation = Modulation(False) if modulation else None

    def forward(self, x, vec, pe, attn_mask=None, modulation_dims=None, transformer_options={}):
        mod = self.modulation(vec)[0] if self.modulation else vec
        qkv, mlp = torch.split(
            self.linear1(apply_mod(F.layer_norm(x, (WIDTH,)), 1 + mod.scale, mod.shift)), [3 * WIDTH, 2 * WIDTH], -1
        )
        q, k, v = _split(qkv)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)
        x += apply_mod(self.linear2(torch.cat((attn, F.gelu(mlp)), 2)), mod.gate)
        return x


class LastLayer(nn.Module):
    def __init__(self, out):
        super().__init__()
        self.linear = nn.Linear(WIDTH, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(WIDTH, 2 * WIDTH))

    def forward(self, x, vec, modulation_dims=None):
        if vec.ndim == 2:
            vec = vec[:, None, :]
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)
        return self.linear(apply_mod(F.layer_norm(x, (WIDTH,)), 1 + scale, shift))


def pad_to_patch_size(x, patch):
    return F.pad(x, (0, (-x.shape[-1]) % patch[1], 0, (-x.shape[-2]) % patch[0]), mode="circular")


class IntegratedFluxTransformer2DModel(nn.Module):
    """Neo's Flux (``global_modulation=False``, ``patch_size`` 2) and Flux.2 (``global_modulation=True``,
    ``patch_size`` 1, four position axes, numbered text ids)."""

    def __init__(self, double=3, single=3, guidance_embed=True, flux2=False):
        super().__init__()
        self.patch_size = 1 if flux2 else 2
        self.channels = 4 * CHANNELS if flux2 else CHANNELS  # Flux.2's latent is patchified by its VAE side
        self.axes_dim = [2, 2, 2, 2] if flux2 else [2, 2, 4]
        self.txt_ids_dims = [3] if flux2 else []
        self.guidance_embed = guidance_embed
        self.global_modulation = flux2
        self.pe_embedder = EmbedND(self.axes_dim)
        self.img_in = nn.Linear(self.channels * self.patch_size**2, WIDTH)
        self.time_in = nn.Linear(16, WIDTH)
        self.guidance_in = nn.Linear(16, WIDTH) if guidance_embed else nn.Identity()
        self.vector_in = nn.Linear(VEC, WIDTH)
        self.txt_in = nn.Linear(CONTEXT, WIDTH)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(modulation=not flux2) for _ in range(double))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(modulation=not flux2) for _ in range(single))
        self.final_layer = LastLayer(self.channels * self.patch_size**2)
        if flux2:
            self.double_stream_modulation_img = Modulation(True)
            self.double_stream_modulation_txt = Modulation(True)
            self.single_stream_modulation = Modulation(False)

    def forward_orig(
        self,
        img,
        img_ids,
        txt,
        txt_ids,
        timesteps,
        y,
        guidance=None,
        control=None,
        transformer_options={},
        attn_mask=None,
    ):
        patches_replace = transformer_options.get("patches_replace", {})
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 16))
        if self.guidance_embed and guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 16))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        vec_orig = vec
        if self.global_modulation:
            vec = (self.double_stream_modulation_img(vec_orig), self.double_stream_modulation_txt(vec_orig))
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        blocks_replace = patches_replace.get("dit", {})
        transformer_options["block_type"] = "double"
        for i, block in enumerate(self.double_blocks):
            transformer_options["block_index"] = i
            args = {"img": img, "txt": txt, "vec": vec, "pe": pe, "attn_mask": attn_mask}
            if ("double_block", i) in blocks_replace:

                def block_wrap(args, block=block):
                    out = {}
                    out["img"], out["txt"] = block(
                        img=args["img"],
                        txt=args["txt"],
                        vec=args["vec"],
                        pe=args["pe"],
                        attn_mask=args.get("attn_mask"),
                        transformer_options=args.get("transformer_options"),
                    )
                    return out

                out = blocks_replace[("double_block", i)](
                    {**args, "transformer_options": transformer_options}, {"original_block": block_wrap}
                )
                img, txt = out["img"], out["txt"]
            else:
                img, txt = block(**args, transformer_options=transformer_options)
            if control is not None and i < len(control.get("input", [])):
                add = control["input"][i]
                if add is not None:
                    img[:, : add.shape[1]] += add
        img = torch.cat((txt, img), 1)
        if self.global_modulation:
            vec, _ = self.single_stream_modulation(vec_orig)
        transformer_options["block_type"] = "single"
        for i, block in enumerate(self.single_blocks):
            transformer_options["block_index"] = i
            img = block(img, vec=vec, pe=pe, attn_mask=attn_mask, transformer_options=transformer_options)
            if control is not None and i < len(control.get("output", [])):
                add = control["output"][i]
                if add is not None:
                    img[:, txt.shape[1] : txt.shape[1] + add.shape[1], ...] += add
        img = img[:, txt.shape[1] :, ...]
        return self.final_layer(img, vec_orig)

    def process_img(self, x, index=0, h_offset=0, w_offset=0):
        bs, _, h, w = x.shape
        p = self.patch_size
        x = pad_to_patch_size(x, (p, p))
        h_len, w_len = (h + p // 2) // p, (w + p // 2) // p
        img = x.view(bs, x.shape[1], h_len, p, w_len, p).permute(0, 2, 4, 1, 3, 5).reshape(bs, h_len * w_len, -1)
        ids = torch.zeros(h_len, w_len, len(self.axes_dim), dtype=x.dtype)
        ids[..., 0] = index
        ids[..., 1] = torch.arange(h_len, dtype=x.dtype)[:, None] + (h_offset + p // 2) // p
        ids[..., 2] = torch.arange(w_len, dtype=x.dtype)[None, :] + (w_offset + p // 2) // p
        return img, ids.reshape(1, h_len * w_len, -1).repeat(bs, 1, 1)

    def forward(
        self,
        x,
        timestep,
        context,
        y=None,
        guidance=None,
        ref_latents=None,
        control=None,
        transformer_options={},
        **kwargs,
    ):
        bs, _, h_orig, w_orig = x.shape
        p = self.patch_size
        h_len, w_len = (h_orig + p // 2) // p, (w_orig + p // 2) // p
        img, img_ids = self.process_img(x)
        img_tokens = img.shape[1]
        ref_latents = dynamic_args.get("ref_latents")
        if ref_latents is not None:
            for ref in ref_latents:  # the "offset" method with one reference: index 1, no offset; batch 1 as
                kontext, kontext_ids = self.process_img(ref, index=1)  # encoded (a call of one row only)
                img, img_ids = torch.cat([img, kontext], dim=1), torch.cat([img_ids, kontext_ids], dim=1)
        txt_ids = torch.zeros((bs, context.shape[1], len(self.axes_dim)), dtype=x.dtype)
        for i in self.txt_ids_dims:
            txt_ids[:, :, i] = torch.arange(context.shape[1], dtype=x.dtype)
        out = self.forward_orig(
            img, img_ids, context, txt_ids, timestep, y, guidance, control, transformer_options,
            attn_mask=kwargs.get("attention_mask"),
        )  # fmt: skip
        out = out[:, :img_tokens]
        out = out.unflatten(1, (h_len, w_len)).unflatten(-1, (self.channels, p, p)).permute(0, 3, 1, 4, 2, 5)
        return out.flatten(4, 5).flatten(2, 3)[:, :, :h_orig, :w_orig]  # rearrange: the rows are the output's


class ChromaModulationOut(ModulationOut):
    @classmethod
    def from_offset(cls, tensor, offset=0):
        return cls(
            tensor[:, offset : offset + 1], tensor[:, offset + 1 : offset + 2], tensor[:, offset + 2 : offset + 3]
        )


class ChromaLastLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(WIDTH, 4 * CHANNELS)

    def forward(self, x, vec):
        shift, scale = vec
        return self.linear(torch.addcmul(shift, 1 + scale, F.layer_norm(x, (WIDTH,))))


class IntegratedChromaTransformer2DModel(nn.Module):
    """Neo's Chroma: Flux's blocks without their own modulation, fed slices of the approximator's output."""

    def __init__(self, double=3, single=3):
        super().__init__()
        self.patch_size = 2
        self.pe_embedder = EmbedND([2, 2, 4])
        self.img_in = nn.Linear(4 * CHANNELS, WIDTH)
        self.txt_in = nn.Linear(CONTEXT, WIDTH)
        self.distilled_guidance_layer = nn.Linear(16 + 16 + 32, WIDTH)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(modulation=False) for _ in range(double))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(modulation=False) for _ in range(single))
        self.final_layer = ChromaLastLayer()

    def modulations(self, mods, kind, idx=0):
        singles, doubles = len(self.single_blocks), len(self.double_blocks)
        if kind == "final":
            return mods[:, -2:-1], mods[:, -1:]
        if kind == "single":
            return ChromaModulationOut.from_offset(mods, 3 * idx)
        offset = 3 * singles + 6 * idx + (6 * doubles if kind == "double_txt" else 0)
        return ChromaModulationOut.from_offset(mods, offset), ChromaModulationOut.from_offset(mods, offset + 3)

    def forward(self, x, timestep, context, guidance=None, control=None, transformer_options={}, **kwargs):
        bs, _, h, w = x.shape
        x = pad_to_patch_size(x, (2, 2))
        h_len, w_len = (h + 1) // 2, (w + 1) // 2
        img = self.img_in(x.view(bs, CHANNELS, h_len, 2, w_len, 2).permute(0, 2, 4, 1, 3, 5).reshape(bs, -1, 16))
        img_ids = torch.zeros(h_len, w_len, 3, dtype=x.dtype)
        img_ids[..., 1] = torch.arange(h_len, dtype=x.dtype)[:, None]
        img_ids[..., 2] = torch.arange(w_len, dtype=x.dtype)[None, :]
        img_ids = img_ids.reshape(1, -1, 3).repeat(bs, 1, 1)
        txt_ids = torch.zeros((bs, context.shape[1], 3), dtype=x.dtype)
        count = 3 * len(self.single_blocks) + 12 * len(self.double_blocks) + 2
        guidance = guidance if guidance is not None else torch.zeros_like(timestep)
        step = torch.cat([timestep_embedding(timestep, 16), timestep_embedding(guidance, 16)], 1)
        index = timestep_embedding(torch.arange(count, dtype=x.dtype), 32).unsqueeze(0).repeat(bs, 1, 1)
        mods = self.distilled_guidance_layer(torch.cat([step.unsqueeze(1).repeat(1, count, 1), index], -1))
        txt = self.txt_in(context)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        attn_mask = kwargs.get("attention_mask")
        for i, block in enumerate(self.double_blocks):
            transformer_options["block_index"] = i
            double_mod = (self.modulations(mods, "double_img", i), self.modulations(mods, "double_txt", i))
            img, txt = block(
                img=img, txt=txt, vec=double_mod, pe=pe, attn_mask=attn_mask, transformer_options=transformer_options
            )
            if control is not None and i < len(control.get("input", [])) and control["input"][i] is not None:
                img += control["input"][i]
        img = torch.cat((txt, img), 1)
        for i, block in enumerate(self.single_blocks):
            transformer_options["block_index"] = i
            img = block(
                img,
                vec=self.modulations(mods, "single", i),
                pe=pe,
                attn_mask=attn_mask,
                transformer_options=transformer_options,
            )
        img = self.final_layer(img[:, txt.shape[1] :, ...], vec=self.modulations(mods, "final"))
        out = img.unflatten(1, (h_len, w_len)).unflatten(-1, (CHANNELS, 2, 2)).permute(0, 3, 1, 4, 2, 5)
        out = out.flatten(4, 5).flatten(2, 3)
        return out[:, :, :h, :w]
