"""Stand-ins for the Forge pieces SEG touches, written from Forge main's source (``dfdcbab6``):
``backend/nn/unet.py`` (transformer_options and the attn1 replace-patch protocol),
``backend/sampling/sampling_function.py`` (calc_cond_uncond_batch, the post-CFG part of
sampling_function_inner) and ``backend/patcher/unet.py`` (UnetPatcher.clone, post-CFG functions).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tests.standins import CrossAttention, SpatialTransformer, TinyUNet


class ForgeTinyUNet(TinyUNet):
    """TinyUNet with Forge's ``transformer_options`` plumbing (``backend/nn/unet.py``): ``original_shape``,
    ``block`` per UNet block, ``block_index`` per transformer, and the ``attn1`` replace-patch protocol of
    ``BasicTransformerBlock._forward``: look up ``(part, id, block_index)`` then ``(part, id)``; call
    ``to_q``/``to_k``/``to_v``, ``patch(q, k, v, extra_options)``, then ``to_out``."""

    def forward(self, x, timesteps, context, transformer_options=None):
        options = dict(transformer_options or {})
        options["original_shape"] = list(x.shape)
        handles = []
        for part, blocks in (
            ("input", self.input_blocks),
            ("middle", [self.middle_block]),
            ("output", self.output_blocks),
        ):
            for index, block in enumerate(blocks):
                for layer in block:
                    if isinstance(layer, SpatialTransformer):
                        for t, tb in enumerate(layer.transformer_blocks):
                            handles.append(_forge_attn1(tb.attn1, options, (part, index), t))
        try:
            return super().forward(x, timesteps, context)
        finally:
            for restore in handles:
                restore()


def _forge_attn1(attn: CrossAttention, options: dict, block: tuple[str, int], block_index: int):
    replace = options.get("patches_replace", {}).get("attn1", {})
    key = (block[0], block[1], block_index)
    patch = replace.get(key, replace.get(block))
    if patch is None:
        return lambda: None
    extra = {k: v for k, v in options.items() if k not in ("patches", "patches_replace")}
    extra.update(
        block=block, block_index=block_index, n_heads=attn.heads, dim_head=attn.to_q.out_features // attn.heads
    )

    def forward(x, context=None, mask=None):
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        return attn.to_out(patch(q, k, v, extra))

    attn.forward = forward
    return lambda: attn.__dict__.pop("forward", None)


def forge_attention(q, k, v, heads):
    b, n, c = q.shape
    split = [t.reshape(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, n, c)


class ForgeModel:
    """``KModel``: ``apply_model`` returns denoised x0; ``calls`` counts UNet calls."""

    def __init__(self, unet: ForgeTinyUNet) -> None:
        self.diffusion_model = unet
        self.calls: list[int] = []

    def apply_model(self, x, sigma, c_crossattn, transformer_options):
        self.calls.append(x.shape[0])
        eps = self.diffusion_model(x, sigma, c_crossattn, transformer_options)
        return x - sigma[:, None, None, None] * eps


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    """``backend/sampling/sampling_function.calc_cond_uncond_batch`` for area-free conds: each entry's
    prediction, averaged (out / count), cond and uncond in one batch; uncond None -> zeros."""
    entries = [(c, 0) for c in cond] + ([(u, 1) for u in uncond] if uncond is not None else [])
    options = dict(model_options.get("transformer_options", {}))
    x = torch.cat([x_in] * len(entries))
    context = torch.cat([e["model_conds"]["c_crossattn"] for e, _ in entries])
    out = model.apply_model(x, torch.cat([timestep] * len(entries)), context, options).chunk(len(entries))
    cond_out = sum(o for o, (_, kind) in zip(out, entries, strict=False) if kind == 0) / len(cond)
    uncond_out = (
        sum(o for o, (_, kind) in zip(out, entries, strict=False) if kind == 1) / len(uncond)
        if uncond is not None
        else torch.zeros_like(x_in)
    )
    return cond_out, uncond_out


def sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options):
    """The post-CFG part of ``sampling_function_inner`` (``backend/sampling/sampling_function.py``)."""
    edit_strength = sum(item.get("strength", 1) for item in cond)
    uncond_ = None if abs(cond_scale - 1.0) < 1e-9 else uncond
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)
    if abs(edit_strength - 1.0) > 1e-9:
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength
    else:
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {
            "denoised": cfg_result,
            "cond": cond,
            "uncond": uncond,
            "model": model,
            "uncond_denoised": uncond_pred,
            "cond_denoised": cond_pred,
            "sigma": timestep,
            "model_options": model_options,
            "input": x,
        }
        cfg_result = fn(args)
    return cfg_result


class UnetPatcher:
    """``backend/patcher/unet.UnetPatcher``: clone() deep-copies model_options; post-CFG functions append."""

    def __init__(self, model: ForgeModel) -> None:
        self.model = model
        self.model_options: dict = {"transformer_options": {}}

    def clone(self) -> UnetPatcher:
        import copy

        other = UnetPatcher(self.model)
        other.model_options = copy.deepcopy(self.model_options)
        return other

    def set_model_sampler_post_cfg_function(self, fn, disable_cfg1_optimization=False):
        self.model_options["sampler_post_cfg_function"] = [*self.model_options.get("sampler_post_cfg_function", []), fn]
