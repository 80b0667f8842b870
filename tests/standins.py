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

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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
    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return F.interpolate(x, size=size, mode="nearest")


class Sequence(nn.ModuleList):
    """``TimestepEmbedSequential``: runs its layers, passing emb / context / the skip size as needed."""

    def run(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor, size: Any = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class TinyUNet(nn.Module):
    """Depths: input 1 (depth 0), input 3 (depth 1), middle (depth 2), output 0 (2), 2 (1), 4 (0)."""

    def __init__(self, in_channels: int = 4, depth: int = 2) -> None:
        super().__init__()
        self.time = nn.Linear(1, WIDTH)
        self.input_blocks = nn.ModuleList(
            [
                Sequence([nn.Conv2d(in_channels, WIDTH, 3, padding=1)]),
                Sequence([ResBlock(WIDTH), SpatialTransformer(WIDTH, depth)]),
                Sequence([Downsample()]),
                Sequence([ResBlock(WIDTH), SpatialTransformer(WIDTH, depth)]),
                Sequence([Downsample()]),
            ]
        )
        self.middle_block = Sequence([ResBlock(WIDTH), SpatialTransformer(WIDTH, depth), ResBlock(WIDTH)])
        self.output_blocks = nn.ModuleList(
            [
                Sequence([ResBlock(2 * WIDTH), SpatialTransformer(WIDTH, depth), Upsample()]),
                Sequence([ResBlock(2 * WIDTH)]),
                Sequence([ResBlock(2 * WIDTH), SpatialTransformer(WIDTH, depth), Upsample()]),
                Sequence([ResBlock(2 * WIDTH)]),
                Sequence([ResBlock(2 * WIDTH), SpatialTransformer(WIDTH, depth)]),
            ]
        )
        self.out = nn.Conv2d(WIDTH, 4, 3, padding=1)
        with torch.no_grad():  # sharp self-attention, so that blurring its queries visibly moves the output
            for module in self.modules():
                if isinstance(module, BasicTransformerBlock):
                    module.attn1.to_q.weight.mul_(6.0)
                    module.attn1.to_k.weight.mul_(6.0)
                    module.attn1.to_v.weight.mul_(3.0)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        emb = torch.tanh(self.time(timesteps.reshape(-1, 1).float()))
        skips = []
        h = x
        for block in self.input_blocks:
            h = block.run(h, emb, context)
            skips.append(h)
        h = self.middle_block.run(h, emb, context)
        for block in self.output_blocks:
            skip = skips.pop()
            h = torch.cat([h, skip], dim=1)
            target = skips[-1].shape[-2:] if skips else None
            h = block.run(h, emb, context, target)
        return self.out(h)


@dataclass
class LatentDiffusion:
    """``shared.sd_model``: ``.model.diffusion_model`` and ``.model.conditioning_key``."""

    model: Any


def make_sd_model(unet: nn.Module, conditioning_key: str = "crossattn") -> LatentDiffusion:
    return LatentDiffusion(SimpleNamespace(diffusion_model=unet, conditioning_key=conditioning_key))


class KDiffusionWrapper:
    """``CompVisDenoiser``-like: returns denoised x0 = x - sigma * eps; ``calls`` counts the UNet calls."""

    def __init__(self, sd_model: LatentDiffusion) -> None:
        self.sd_model = sd_model
        self.calls: list[int] = []

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        self.calls.append(x.shape[0])
        unet = self.sd_model.model.diffusion_model
        context = cond["crossattn"] if "crossattn" in cond else cond["c_crossattn"][0]
        concat = cond.get("c_concat", [None])[0]
        x_unet = x
        if concat is not None and concat.shape[-2:] == x.shape[-2:]:  # inpainting models: 9 channels
            x_unet = torch.cat([x, concat], dim=1)
        eps = unet(x_unet, sigma, context)
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

        x_out = self.inner_model(x_in, sigma_in, cond=condition(cond_in, image_cond_in[: x_in.shape[0]]))
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


class FakeHost:
    """``seg_lib.host.a1111.Host`` over a stand-in ``shared``."""

    def __init__(self, sd_model: LatentDiffusion, **opts: Any) -> None:
        self.sd_model = sd_model
        self._opts = SimpleNamespace(pad_cond_uncond=False, pad_cond_uncond_v0=False, **opts)

    def unet(self) -> nn.Module | None:
        return getattr(self.sd_model.model, "diffusion_model", None)

    def conditioning_key(self) -> str | None:
        return self.sd_model.model.conditioning_key

    def opts(self) -> Any:
        return self._opts


def make_p() -> Any:
    return SimpleNamespace(extra_generation_params={})
