"""A toy UNet with reForge's module layout and forward, written from reForge's source (``main`` ``3b56b268``):

- ``ldm_patched/modules/patcher_extension.py``: ``WrapperExecutor`` over ``transformer_options["wrappers"]``;
- ``ldm_patched/ldm/modules/attention.py``: ``SpatialTransformer.forward`` writing ``activations_shape`` (its
  input's shape) and ``block_index``; ``BasicTransformerBlock.forward``'s extra options (every option but the
  patches, plus ``n_heads``, ``dim_head``, ``attn_precision``), ``attn1_patch``, the ``attn1`` replace lookup
  ``(part, id, block_index)`` then ``(part, id)``, ``attn1_output_patch``;
- ``ldm_patched/ldm/modules/diffusionmodules/openaimodel.py``: ``forward_timestep_embed`` (each layer by its
  kind, no block inner modifiers), ``TimestepEmbedSequential.forward`` delegating to it, ``apply_control``
  (a residual popped, resized to the hidden state, added out of place), ``UNetModel.forward`` -> a wrapper
  executor over the ``diffusion_model`` wrappers -> ``_forward``, ComfyUI's body: ``emb_patch``, no block
  modifiers, ControlNet residuals, the input/output block patches, the cast before ``self.out``.

The widths, depths and blocks of ``tests.standins.TinyUNet``; the leaf modules are ``tests.standins_forge_unet``'s
(reForge calls a ResBlock with ``(x, emb)`` and an Upsample with ``output_shape``, as those take them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tests import standins
from tests.standins import CONTEXT, WIDTH, ToyParts, add_toy_blocks, sharpen_self_attention
from tests.standins_forge import forge_attention
from tests.standins_forge_unet import Downsample, ResBlock, TimestepBlock, Upsample, timestep_embedding

DIFFUSION_MODEL = "diffusion_model"


# -- patcher_extension.py --------------------------------------------------------------------------------------
def get_all_wrappers(wrapper_type, transformer_options, is_model_options=False):
    """Every wrapper of a kind: ``transformer_options["wrappers"][kind][key]`` lists, all keys."""
    if is_model_options:
        transformer_options = transformer_options.get("transformer_options", {})
    groups = transformer_options.get("wrappers", {}).get(wrapper_type, {})
    return [wrapper for group in groups.values() for wrapper in group]


class WrapperExecutor:
    """Calls ``wrappers[idx](executor, *args)``; a wrapper calls the executor to go on; the last calls
    ``original``. ``class_obj`` is what the wrapped method belongs to."""

    def __init__(self, original, class_obj, wrappers, idx=0):
        self.original, self.class_obj, self.wrappers, self.idx = original, class_obj, list(wrappers), idx

    def __call__(self, *args, **kwargs):
        return WrapperExecutor(self.original, self.class_obj, self.wrappers, self.idx + 1).execute(*args, **kwargs)

    def execute(self, *args, **kwargs):
        if self.idx == len(self.wrappers):
            return self.original(*args, **kwargs)
        return self.wrappers[self.idx](self, *args, **kwargs)


# -- attention.py ----------------------------------------------------------------------------------------------
class CrossAttention(standins.CrossAttention):
    """reForge's: keys from ``context`` (else x), values from ``value`` (else the keys' source)."""

    def forward(self, x, context=None, value=None, mask=None):
        q = self.to_q(x)
        context = x if context is None else context
        k, v = self.to_k(context), self.to_v(context if value is None else value)
        return self.to_out(forge_attention(q, k, v, self.heads))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int = 2, attn_precision=None) -> None:
        super().__init__()
        self.n_heads, self.d_head, self.attn_precision = heads, dim // heads, attn_precision
        self.attn1 = CrossAttention(dim, heads=heads)
        self.attn2 = CrossAttention(dim, CONTEXT, heads=heads)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context=None, transformer_options={}):  # noqa: B006 (the host's)
        patches = transformer_options.get("patches", {})
        replace = transformer_options.get("patches_replace", {})
        extra_options = {k: v for k, v in transformer_options.items() if k not in ("patches", "patches_replace")}
        extra_options.update(n_heads=self.n_heads, dim_head=self.d_head, attn_precision=self.attn_precision)
        n = self.norm1(x)
        context_attn1 = value_attn1 = None
        if "attn1_patch" in patches:
            context_attn1 = value_attn1 = n
            for p in patches["attn1_patch"]:
                n, context_attn1, value_attn1 = p(n, context_attn1, value_attn1, extra_options)
        block = transformer_options.get("block")
        key = None if block is None else (block[0], block[1], transformer_options.get("block_index", 0))
        attn1_replace = replace.get("attn1", {})
        if key not in attn1_replace:
            key = block
        if key in attn1_replace:
            if context_attn1 is None:
                context_attn1 = value_attn1 = n
            q, k, v = self.attn1.to_q(n), self.attn1.to_k(context_attn1), self.attn1.to_v(value_attn1)
            n = self.attn1.to_out(attn1_replace[key](q, k, v, extra_options))
        else:
            n = self.attn1(n, context=context_attn1, value=value_attn1)
        for p in patches.get("attn1_output_patch", []):
            n = p(n, extra_options)
        x = n + x
        return x + self.attn2(self.norm2(x), context=context)


class SpatialTransformer(nn.Module):
    def __init__(self, dim: int, depth: int) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(dim) for _ in range(depth))

    def forward(self, x, context=None, transformer_options={}):  # noqa: B006
        if not isinstance(context, list):
            context = [context] * len(self.transformer_blocks)
        b, c, h, w = x.shape
        transformer_options["activations_shape"] = list(x.shape)
        tokens = x.movedim(1, 3).flatten(1, 2)  # row-major h·w tokens
        for i, block in enumerate(self.transformer_blocks):
            transformer_options["block_index"] = i
            tokens = block(tokens, context=context[i], transformer_options=transformer_options)
        return tokens.reshape(b, h, w, c).movedim(3, 1) + x


# -- openaimodel.py --------------------------------------------------------------------------------------------
def forward_timestep_embed(
    ts, x, emb, context=None, transformer_options={}, output_shape=None,  # noqa: B006
    time_context=None, num_video_frames=None, image_only_indicator=None,
):  # fmt: skip
    """Each layer of the block by its kind; no block inner modifiers (reForge dropped them)."""
    for layer in ts:
        if isinstance(layer, TimestepBlock):
            x = layer(x, emb)
        elif isinstance(layer, SpatialTransformer):
            x = layer(x, context, transformer_options)
            if "transformer_index" in transformer_options:
                transformer_options["transformer_index"] += 1
        elif isinstance(layer, Upsample):
            x = layer(x, output_shape=output_shape)
        else:
            handlers = transformer_options.get("patches", {}).get("forward_timestep_embed_patch", [])
            handler = next((h for kind, h in handlers if isinstance(layer, kind)), None)
            if handler is None:
                x = layer(x)
            else:
                x = handler(layer, x, emb, context, transformer_options, output_shape, time_context)
    return x


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    def forward(self, *args, **kwargs):
        return forward_timestep_embed(self, *args, **kwargs)


def apply_control(h, control, name):
    if control is not None and name in control and len(control[name]) > 0:
        ctrl = control[name].pop()
        if ctrl is not None:
            ctrl = ctrl.to(h)
            if ctrl.shape[-2:] != h.shape[-2:]:
                ctrl = F.interpolate(ctrl, size=tuple(h.shape[-2:]), mode="bicubic", align_corners=False)
            h = h + ctrl
    return h


class UNetModel(nn.Module):
    """Depths: input 1 (depth 0), input 3 (depth 1), middle (depth 2), output 0 (2), 2 (1), 4 (0)."""

    def __init__(self, in_channels: int = 4, depth: int = 2, adm_in: int | None = None) -> None:
        super().__init__()
        self.model_channels, self.default_num_video_frames, self.predict_codebook_ids = WIDTH, None, False
        self.dtype = torch.get_default_dtype()
        self.time_embed = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.SiLU(), nn.Linear(WIDTH, WIDTH))
        self.num_classes = None if adm_in is None else "sequential"
        if adm_in is not None:
            self.label_emb = nn.Sequential(nn.Linear(adm_in, WIDTH))
        parts = ToyParts(TimestepEmbedSequential, ResBlock, SpatialTransformer, Downsample, Upsample)
        add_toy_blocks(self, parts, in_channels, depth)
        self.out = nn.Sequential(nn.GroupNorm(2, WIDTH), nn.SiLU(), nn.Conv2d(WIDTH, 4, 3, padding=1))
        sharpen_self_attention(self, BasicTransformerBlock)

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        wrappers = get_all_wrappers(DIFFUSION_MODEL, transformer_options)
        executor = WrapperExecutor(self._forward, self, wrappers)
        return executor.execute(x, timesteps, context, y, control, transformer_options, **kwargs)

    def _forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        """ComfyUI's body: emb patches, no block modifiers, ControlNet residuals, block patches."""
        transformer_options["original_shape"] = list(x.shape)
        transformer_options["transformer_index"] = 0
        patches = transformer_options.get("patches", {})
        video = {
            "time_context": kwargs.get("time_context"),
            "num_video_frames": kwargs.get("num_video_frames", self.default_num_video_frames),
            "image_only_indicator": kwargs.get("image_only_indicator"),
        }
        assert (y is not None) == (self.num_classes is not None), "y if and only if class-conditional"
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels, repeat_only=False).to(x.dtype))
        for p in patches.get("emb_patch", []):
            emb = p(emb, self.model_channels, transformer_options)
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        h, hs = x, []
        for index, module in enumerate(self.input_blocks):
            transformer_options["block"] = ("input", index)
            h = forward_timestep_embed(module, h, emb, context, transformer_options, **video)
            h = apply_control(h, control, "input")
            for p in patches.get("input_block_patch", []):
                h = p(h, transformer_options)
            hs.append(h)
            for p in patches.get("input_block_patch_after_skip", []):
                h = p(h, transformer_options)
        transformer_options["block"] = ("middle", 0)
        h = forward_timestep_embed(self.middle_block, h, emb, context, transformer_options, **video)
        h = apply_control(h, control, "middle")
        for index, module in enumerate(self.output_blocks):
            transformer_options["block"] = ("output", index)
            skip = apply_control(hs.pop(), control, "output")
            for p in patches.get("output_block_patch", []):
                h, skip = p(h, skip, transformer_options)
            h = torch.cat([h, skip], dim=1)
            output_shape = hs[-1].shape if hs else None
            h = forward_timestep_embed(module, h, emb, context, transformer_options, output_shape, **video)
        h = h.type(x.dtype)
        return self.id_predictor(h) if self.predict_codebook_ids else self.out(h)
