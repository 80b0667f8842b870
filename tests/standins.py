"""Small stand-ins for the A1111 pieces SEG touches, written from the host's source (v1.10.1):

- ``TinyUNet``: the ldm/sgm ``UNetModel`` structure (``input_blocks`` / ``middle_block`` / ``output_blocks``
  of ``TimestepEmbedSequential``-like sequences; ``SpatialTransformer`` flattening ``b c h w -> b (h w) c``
  row-major; ``transformer_blocks[i].attn1`` whose forward starts with ``q = self.to_q(x)``; stride-2
  ``Downsample`` convs with padding 1 and ``Upsample`` brought back to the skip's size), at toy width.
- ``Denoiser``: ``CFGDenoiser.forward``'s flow from ``modules/sd_samplers_cfg_denoiser.py``: the x_in row
  order (each image's cond rows, then the uncond rows; edit models add a second uncond block), the
  ``CFGDenoiserParams`` callback with read-back, skip-uncond with a fake uncond, one batched inner-model
  call, ``combine_denoised`` and ``combine_denoised_for_edit_model`` exactly as the host writes them, the
  mask blend after denoising.
- ``KDiffusionWrapper``: the k-diffusion inner model: ``inner_model(x, sigma, cond=...)`` -> denoised x0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seg_lib.host.a1111_host import Host

WIDTH = 8
CONTEXT = 6


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int | None = None, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: Any = None) -> torch.Tensor:
        q = self.to_q(x)
        context = x if context is None else context
        k, v = self.to_k(context), self.to_v(context)
        b, n, c = q.shape
        split = [t.reshape(b, -1, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, n, c)
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attn1 = CrossAttention(dim)
        self.attn2 = CrossAttention(dim, CONTEXT)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        return self.attn2(self.norm2(x), context=context) + x


class SpatialTransformer(nn.Module):
    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(dim) for _ in range(depth))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # 'b c h w -> b (h w) c'
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        return tokens.reshape(b, h, w, c).permute(0, 3, 1, 2) + x


class ResBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int = WIDTH) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels_in, channels_out, 3, padding=1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x) + emb[:, : self.conv.out_channels, None, None])


class Downsample(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.op = nn.Conv2d(WIDTH, WIDTH, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """ldm's Upsample: nearest x2 then a conv; odd sizes are mended by the host's ``th.cat``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(WIDTH, WIDTH, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Sequence(nn.Sequential):
    """``TimestepEmbedSequential``: each layer gets emb or context when it takes one."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class _TorchHijackForUnet:
    """A1111's ``sd_hijack_unet.th``: torch, with a ``cat`` that resizes the first of two maps to the second's
    size (so latents need only be multiples of 8); A1111 installs it as ``openaimodel.th``."""

    def __getattr__(self, item: str) -> Any:
        return getattr(torch, item)

    def cat(self, tensors: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if len(tensors) == 2 and tensors[0].shape[-2:] != tensors[1].shape[-2:]:
            tensors = (F.interpolate(tensors[0], tensors[1].shape[-2:], mode="nearest"), tensors[1])
        return torch.cat(tensors, *args, **kwargs)


@dataclass(frozen=True)
class ToyParts:
    """A host's module classes for the toy UNet's blocks (``tests.standins_forge_unet`` has Forge's)."""

    sequence: type[nn.Module]
    res_block: type[nn.Module]
    transformer: type[nn.Module]
    downsample: type[nn.Module]
    upsample: type[nn.Module]


def add_toy_blocks(unet: nn.Module, parts: ToyParts, in_channels: int, depth: int) -> None:
    """The toy UNet's three block lists, the same on both hosts so that a layer selection means the same layer.

    Depths: input 1 (depth 0), input 3 (depth 1), middle (depth 2), output 0 (2), 2 (1), 4 (0)."""
    seq, res, st = parts.sequence, parts.res_block, parts.transformer
    unet.input_blocks = nn.ModuleList(
        [
            seq(nn.Conv2d(in_channels, WIDTH, 3, padding=1)),
            seq(res(WIDTH), st(WIDTH, depth)),
            seq(parts.downsample()),
            seq(res(WIDTH), st(WIDTH, depth)),
            seq(parts.downsample()),
        ]
    )
    unet.middle_block = seq(res(WIDTH), st(WIDTH, depth), res(WIDTH))
    unet.output_blocks = nn.ModuleList(
        [
            seq(res(2 * WIDTH), st(WIDTH, depth), parts.upsample()),
            seq(res(2 * WIDTH)),
            seq(res(2 * WIDTH), st(WIDTH, depth), parts.upsample()),
            seq(res(2 * WIDTH)),
            seq(res(2 * WIDTH), st(WIDTH, depth)),
        ]
    )


def sharpen_self_attention(unet: nn.Module, block_type: type[nn.Module]) -> None:
    """Sharp self-attention, so that blurring its queries visibly moves the output."""
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, block_type):
                module.attn1.to_q.weight.mul_(6.0)
                module.attn1.to_k.weight.mul_(6.0)
                module.attn1.to_v.weight.mul_(3.0)


th = _TorchHijackForUnet()  # read by TinyUNet.forward from this module's globals, as ldm's forward reads its own


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000, repeat_only: bool = False):
    """Sinusoidal embedding of (possibly fractional) timesteps, ``[N, dim]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half) / half)
    args = timesteps.to(freqs.dtype)[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TinyUNet(nn.Module):
    """The ldm/sgm ``UNetModel`` at toy width: the same attributes SEG reads (``model_channels``,
    ``time_embed``, ``num_classes``/``label_emb``, ``dtype``, ``predict_codebook_ids``, the three block lists,
    ``out``) and a ``forward`` with the stock body (module-level ``th`` and ``timestep_embedding``).

    Depths: input 1 (depth 0), input 3 (depth 1), middle (depth 2), output 0 (2), 2 (1), 4 (0).
    ``adm_in`` makes it class-conditional the SDXL way (``y`` is a vector per row)."""

    def __init__(self, in_channels: int = 4, depth: int = 2, adm_in: int | None = None) -> None:
        super().__init__()
        self.model_channels = WIDTH
        self.dtype = torch.get_default_dtype()
        self.predict_codebook_ids = False
        self.time_embed = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.SiLU(), nn.Linear(WIDTH, WIDTH))
        self.num_classes = None if adm_in is None else "sequential"
        if adm_in is not None:
            self.label_emb = nn.Sequential(nn.Linear(adm_in, WIDTH))
        add_toy_blocks(self, ToyParts(Sequence, ResBlock, SpatialTransformer, Downsample, Upsample), in_channels, depth)
        self.out = nn.Conv2d(WIDTH, 4, 3, padding=1)
        sharpen_self_attention(self, BasicTransformerBlock)

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        hs = []
        t_emb = timestep_embedding(timesteps, self.model_channels, repeat_only=False)
        emb = self.time_embed(t_emb)
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        h = x.type(self.dtype)
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = th.cat([h, hs.pop()], dim=1)
            h = module(h, emb, context)
        h = h.type(x.dtype)
        return self.out(h)


@dataclass
class LatentDiffusion:
    """``shared.sd_model``: ``.model.diffusion_model`` and ``.model.conditioning_key``."""

    model: Any


def make_sd_model(unet: nn.Module, conditioning_key: str = "crossattn") -> LatentDiffusion:
    return LatentDiffusion(SimpleNamespace(diffusion_model=unet, conditioning_key=conditioning_key))


class KDiffusionWrapper(nn.Module):
    """``CompVisDenoiser``-like (an ``nn.Module``, as k-diffusion's are): scales the input by
    ``c_in = 1 / sqrt(sigma^2 + 1)``, calls the UNet (``c_adm``/``vector`` as ``y``), returns denoised
    ``x - sigma * eps``; ``calls`` counts the UNet calls by their row count."""

    def __init__(self, sd_model: LatentDiffusion) -> None:
        super().__init__()
        self.sd_model = sd_model
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        self.calls.append(x.shape[0])
        unet = self.sd_model.model.diffusion_model
        context = cond["crossattn"] if "crossattn" in cond else cond["c_crossattn"][0]
        concat = cond.get("c_concat", [None])[0]
        c_in = (sigma**2 + 1) ** -0.5
        x_unet = x * c_in[:, None, None, None]
        if concat is not None and concat.shape[-2:] == x.shape[-2:]:  # inpainting models: 9 channels
            x_unet = torch.cat([x_unet, concat], dim=1)
        y = cond.get("vector", cond.get("c_adm"))
        eps = unet(x_unet, sigma, context=context, y=y)
        return x - sigma[:, None, None, None] * eps


def reconstruct(conds: list[list[tuple[torch.Tensor, float]]]) -> tuple[list[list[tuple[int, float]]], torch.Tensor]:
    """``prompt_parser.reconstruct_multicond_batch``: per image (row index, weight), and the stacked rows."""
    conds_list, rows = [], []
    for image in conds:
        pairs = []
        for tensor, weight in image:
            pairs.append((len(rows), weight))
            rows.append(tensor)
        conds_list.append(pairs)
    return conds_list, torch.stack(rows)


class Denoiser:
    """``CFGDenoiser`` reduced to what SEG depends on (see the module docstring)."""

    def __init__(self, inner_model: KDiffusionWrapper, p: Any, callback: Any) -> None:
        self.inner_model = inner_model
        self.p = p
        self.callback = callback
        self.mask = self.nmask = self.init_latent = None
        self.image_cfg_scale: float | None = None
        self.step = 0

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        denoised_uncond = x_out[-uncond.shape[0] :]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised

    def combine_denoised_for_edit_model(self, x_out, cond_scale):
        out_cond, out_img_cond, out_uncond = x_out.chunk(3)
        return out_uncond + cond_scale * (out_cond - out_img_cond) + self.image_cfg_scale * (out_img_cond - out_uncond)

    def forward(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        uncond: torch.Tensor,
        conds: list[list[tuple[torch.Tensor, float]]],
        cond_scale: float,
        image_cond: torch.Tensor,
        *,
        step: int = 0,
        steps: int = 1,
        skip_uncond: bool = False,
        edit: bool = False,
        batch_cond_uncond: bool = True,
    ) -> torch.Tensor:
        conds_list, tensor = reconstruct(conds)
        batch_size = len(conds_list)
        repeats = [len(c) for c in conds_list]
        image_uncond = image_cond
        stack = [torch.stack([x[i] for _ in range(n)]) for i, n in enumerate(repeats)]
        x_in = torch.cat([*stack, x] + ([x] if edit else []))
        sigma_in = torch.cat(
            [torch.stack([sigma[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [sigma] * (2 if edit else 1)
        )
        image_cond_in = torch.cat(
            [torch.stack([image_cond[i] for _ in range(n)]) for i, n in enumerate(repeats)]
            + [image_uncond]
            + ([torch.zeros_like(image_cond)] if edit else [])
        )
        params = SimpleNamespace(
            x=x_in,
            image_cond=image_cond_in,
            sigma=sigma_in,
            sampling_step=step,
            total_sampling_steps=steps,
            text_cond=tensor,
            text_uncond=uncond,
            denoiser=self,
        )
        self.callback(params)
        x_in, image_cond_in, sigma_in = params.x, params.image_cond, params.sigma
        tensor, uncond = params.text_cond, params.text_uncond
        if skip_uncond:
            x_in, sigma_in = x_in[:-batch_size], sigma_in[:-batch_size]
            cond_in = tensor
        else:
            cond_in = torch.cat([tensor, uncond] + ([uncond] if edit else []))

        def condition(c: torch.Tensor, ic: torch.Tensor) -> dict[str, Any]:
            return {"c_crossattn": [c], "c_concat": [ic]}

        if batch_cond_uncond:
            # image_cond_in whole, as the host passes it: on skip-uncond steps it has more rows than x_in
            x_out = self.inner_model(x_in, sigma_in, cond=condition(cond_in, image_cond_in))
        else:  # the host's loop when "batch cond/uncond" is off: batch_size rows per call
            x_out = torch.zeros_like(x_in)
            for a in range(0, x_out.shape[0], batch_size):
                b = a + batch_size
                x_out[a:b] = self.inner_model(
                    x_in[a:b], sigma_in[a:b], cond=condition(cond_in[a:b], image_cond_in[a:b])
                )
        if skip_uncond:
            x_out = torch.cat([x_out, torch.cat([x_out[c[0][0] : c[0][0] + 1] for c in conds_list])])
        if edit:
            denoised = self.combine_denoised_for_edit_model(x_out, cond_scale)
        elif skip_uncond:
            denoised = self.combine_denoised(x_out, conds_list, uncond, 1.0)
        else:
            denoised = self.combine_denoised(x_out, conds_list, uncond, cond_scale)
        if self.mask is not None:
            denoised = denoised * self.nmask + self.init_latent * self.mask
        self.step += 1
        return denoised


class FakeHost(Host):
    """``seg_lib.host.a1111_host.Host`` over a stand-in ``shared`` (what it reads from ``modules`` replaced)."""

    def __init__(self, sd_model: LatentDiffusion, **opts: Any) -> None:
        self.sd_model = sd_model
        self._opts = SimpleNamespace(pad_cond_uncond=False, pad_cond_uncond_v0=False, **opts)
        self.custom_unet = False

    def stock_forwards(self) -> dict[Any, bool]:
        return {TinyUNet.forward: True}

    def custom_unet_active(self) -> bool:
        return self.custom_unet

    def unet(self) -> nn.Module | None:
        return getattr(self.sd_model.model, "diffusion_model", None)

    def conditioning_key(self) -> str | None:
        return self.sd_model.model.conditioning_key

    def opts(self) -> Any:
        return self._opts


def make_p() -> Any:
    return SimpleNamespace(extra_generation_params={})
