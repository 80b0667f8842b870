"""Stand-ins for the Forge pieces SEG touches, written from Forge main's source (``dfdcbab6``):
``backend/nn/unet.py`` (transformer_options and the attn1 replace-patch protocol),
``backend/modules/k_model.py`` (``KModel.apply_model`` / ``memory_required``),
``backend/sampling/sampling_function.py`` (calc_cond_uncond_batch, sampling_function_inner) and
``backend/patcher/unet.py`` + ``base.py`` (UnetPatcher.clone, pre-/post-CFG functions, the UNet function
wrapper). The ``ldm_patched`` family has the same calc_cond_uncond_batch and sampling flow.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from tests.standins import CrossAttention, SpatialTransformer, TinyUNet, th, timestep_embedding

COND, UNCOND = 0, 1


class ForgeTinyUNet(TinyUNet):
    """TinyUNet with Forge's ``transformer_options`` plumbing (``backend/nn/unet.py``): ``original_shape``
    written into the dict it is given, ``block`` per UNet block, ``block_index`` per transformer, and the
    ``attn1`` replace-patch protocol of ``BasicTransformerBlock._forward``: look up ``(part, id,
    block_index)`` then ``(part, id)``; pass every transformer option but the patches on as extra options;
    call ``to_q``/``to_k``/``to_v``, ``patch(q, k, v, extra_options)``, then ``to_out``. The forward body is
    ``IntegratedUNet2DConditionModel.forward``'s: ``block_modifiers`` around each block, the
    ``input_block_patch`` / ``input_block_patch_after_skip`` / ``output_block_patch`` patches (FreeU, Kohya
    HRFix), and ``TimestepEmbedSequential``'s ``block_inner_modifiers`` around each layer (here: around each
    SpatialTransformer, the layers they are asked about)."""

    def forward(self, x, timesteps=None, context=None, y=None, control=None, transformer_options=None, **kwargs):
        options = {} if transformer_options is None else transformer_options
        options["original_shape"] = list(x.shape)
        handles = []
        for part, blocks in (
            ("input", self.input_blocks),
            ("middle", [self.middle_block]),
            ("output", self.output_blocks),
        ):
            for index, block in enumerate(blocks):
                for layer_index, layer in enumerate(block):
                    if isinstance(layer, SpatialTransformer):
                        handles.append(_inner_modifiers(layer, layer_index, block, options))
                        for t, tb in enumerate(layer.transformer_blocks):
                            handles.append(_forge_attn1(tb.attn1, options, (part, index), t))
        try:
            return self._forge_forward(x, timesteps, context, y, options)
        finally:
            for restore in handles:
                restore()

    def _forge_forward(self, x, timesteps, context, y, options):
        patches = options.get("patches", {})
        modifiers = options.get("block_modifiers", [])

        def run(block, h, where):
            options["block"] = where
            for modifier in modifiers:
                h = modifier(h, "before", options)
            h = block(h, emb, context)
            for modifier in modifiers:
                h = modifier(h, "after", options)
            return h

        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        h, hs = x.type(self.dtype), []
        for index, module in enumerate(self.input_blocks):
            h = run(module, h, ("input", index))
            for patch in patches.get("input_block_patch", []):
                h = patch(h, options)
            hs.append(h)
            for patch in patches.get("input_block_patch_after_skip", []):
                h = patch(h, options)
        h = run(self.middle_block, h, ("middle", 0))
        for index, module in enumerate(self.output_blocks):
            options["block"] = ("output", index)
            hsp = hs.pop()
            for patch in patches.get("output_block_patch", []):
                h, hsp = patch(h, hsp, options)
            h = run(module, th.cat([h, hsp], dim=1), ("output", index))
        return self.out(h.type(x.dtype))


def _inner_modifiers(layer: SpatialTransformer, layer_index: int, block, options: dict):
    """``TimestepEmbedSequential.forward`` calls each block inner modifier with (x, 'before', layer, ...)
    before the layer and (x, 'after', ...) after it; a modifier may return another x."""
    modifiers = options.get("block_inner_modifiers", [])
    if not modifiers:
        return lambda: None

    def before(module, args):
        x = args[0]
        for modifier in modifiers:
            x = modifier(x, "before", module, layer_index, block, options)
        return (x, *args[1:])

    def after(module, args, out):
        for modifier in modifiers:
            out = modifier(out, "after", module, layer_index, block, options)
        return out

    handles = [layer.register_forward_pre_hook(before), layer.register_forward_hook(after)]
    return lambda: [handle.remove() for handle in handles]


def _forge_attn1(attn: CrossAttention, options: dict, block: tuple[str, int], block_index: int):
    replace = options.get("patches_replace", {}).get("attn1", {})
    key = (block[0], block[1], block_index)
    patch = replace.get(key, replace.get(block))
    if patch is None:
        return lambda: None

    def forward(x, context=None, mask=None):
        # Built per call, as BasicTransformerBlock._forward does: it sees what modifiers wrote just before.
        extra = {k: v for k, v in options.items() if k not in ("patches", "patches_replace")}
        extra.update(
            block=block, block_index=block_index, n_heads=attn.heads, dim_head=attn.to_q.out_features // attn.heads
        )
        q, k, v = attn.to_q(x), attn.to_k(x), attn.to_v(x)
        return attn.to_out(patch(q, k, v, extra))

    attn.forward = forward
    return lambda: attn.__dict__.pop("forward", None)


def forge_attention(q, k, v, heads):
    b, n, c = q.shape
    split = [t.reshape(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, n, c)


class MemoryManagement:
    """``backend/memory_management.get_free_memory``; ``free`` is what it reports (bytes)."""

    def __init__(self) -> None:
        self.free = math.inf

    def get_free_memory(self, dev=None):
        return self.free


class ForgeModel:
    """``KModel``: ``apply_model`` concatenates ``c_concat`` to the input channels, passes ``y`` and the
    transformer options on, and returns denoised x0; ``memory_required`` is KModel's estimate (pytorch
    attention, 4-byte dtype). ``calls`` records the rows of every UNet call; ``memory`` is the memory
    manager calc_cond_uncond_batch asks (here per model, so that tests share no state)."""

    def __init__(self, unet: ForgeTinyUNet) -> None:
        self.diffusion_model = unet
        self.calls: list[int] = []
        self.memory = MemoryManagement()

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        self.calls.append(x.shape[0])
        xc = x if c_concat is None else torch.cat([x, c_concat], dim=1)
        eps = self.diffusion_model(
            xc, t, context=c_crossattn, control=control, transformer_options=transformer_options or {}, **kwargs
        )
        return x - t[:, None, None, None] * eps

    def memory_required(self, input_shape):
        return 1.28 * input_shape[0] * input_shape[2] * input_shape[3] * 4 * 16384


class ControlStub:
    """A ControlNet in Forge's linked list: ``get_control`` returns per-block residual lists (not a tensor)."""

    previous_controlnet = None

    def __init__(self) -> None:
        self.transformer_options = None
        self.batched: list[int] = []

    def get_control(self, x_noisy, t, cond, batched_number):
        self.batched.append(batched_number)
        return {"input": [], "middle": [torch.zeros(x_noisy.shape[0])], "output": []}


def _area_and_mult(entry, x_in):
    """``get_area_and_mult`` for area- and mask-free entries: the whole latent, mult = strength."""
    assert "area" not in entry, "the stand-in does not model regional conds"
    assert "mask" not in entry, "the stand-in does not model regional conds"
    mult = torch.ones_like(x_in) * entry.get("strength", 1.0)
    conditioning = {k: v.to(x_in.device) for k, v in entry["model_conds"].items()}
    return x_in, mult, conditioning, entry.get("control")


def _can_concat(a, b):
    return (
        a[0].shape == b[0].shape
        and a[3] is b[3]
        and a[2].keys() == b[2].keys()
        and all(a[2][k].shape == b[2][k].shape for k in a[2])
    )


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    """``backend/sampling/sampling_function.calc_cond_uncond_batch`` for area-free conds: the entries that
    concatenate go in one batch, in reverse order (uncond chunks before cond), as many as
    ``model.memory_required`` says fit in free memory; transformer_options copied per call with
    ``cond_or_uncond``, ``sigmas``, ``cond_mark`` and the cond/uncond row indices; ControlNet's ``control``
    added to ``c``; the call through ``model_options["model_function_wrapper"]`` when there is one; each
    chunk accumulated with its mult and divided by the count (which starts at 1e-37)."""
    out_cond, out_count = torch.zeros_like(x_in), torch.ones_like(x_in) * 1e-37
    out_uncond, out_uncond_count = torch.zeros_like(x_in), torch.ones_like(x_in) * 1e-37
    to_run = [(_area_and_mult(e, x_in), COND) for e in cond]
    to_run += [(_area_and_mult(e, x_in), UNCOND) for e in uncond] if uncond is not None else []
    while to_run:
        first = to_run[0]
        first_shape = first[0][0].shape
        to_batch_temp = [i for i in range(len(to_run)) if _can_concat(to_run[i][0], first[0])]
        to_batch_temp.reverse()
        to_batch = to_batch_temp[:1]
        free_memory = model.memory.get_free_memory(x_in.device)
        for i in range(1, len(to_batch_temp) + 1):
            batch_amount = to_batch_temp[: len(to_batch_temp) // i]
            if model.memory_required([len(batch_amount) * first_shape[0], *first_shape[1:]]) < free_memory:
                to_batch = batch_amount
                break
        input_x, mult, conditionings, cond_or_uncond, control = [], [], [], [], None
        for i in to_batch:
            (x, m, conditioning, control), kind = to_run.pop(i)
            input_x.append(x)
            mult.append(m)
            conditionings.append(conditioning)
            cond_or_uncond.append(kind)
        batch_chunks = len(cond_or_uncond)
        input_x = torch.cat(input_x)
        c = {k: torch.cat([cd[k] for cd in conditionings]) for k in conditionings[0]}
        timestep_ = torch.cat([timestep] * batch_chunks)
        transformer_options = (
            model_options["transformer_options"].copy() if "transformer_options" in model_options else {}
        )
        transformer_options["cond_or_uncond"] = cond_or_uncond[:]
        transformer_options["sigmas"] = timestep
        rows = timestep.shape[0]
        transformer_options["cond_mark"] = torch.tensor([k for k in cond_or_uncond for _ in range(rows)]).to(timestep)
        transformer_options["cond_indices"] = [
            i * rows + r for i, k in enumerate(cond_or_uncond) if k == COND for r in range(rows)
        ]
        transformer_options["uncond_indices"] = [
            i * rows + r for i, k in enumerate(cond_or_uncond) if k == UNCOND for r in range(rows)
        ]
        c["transformer_options"] = transformer_options
        if control is not None:
            control.transformer_options = transformer_options
            c["control"] = control.get_control(input_x, timestep_, c.copy(), len(cond_or_uncond))
            c["control_model"] = control
        if "model_function_wrapper" in model_options:
            args = {"input": input_x, "timestep": timestep_, "c": c, "cond_or_uncond": cond_or_uncond}
            output = model_options["model_function_wrapper"](model.apply_model, args).chunk(batch_chunks)
        else:
            output = model.apply_model(input_x, timestep_, **c).chunk(batch_chunks)
        for o in range(batch_chunks):
            if cond_or_uncond[o] == COND:
                out_cond += output[o] * mult[o]
                out_count += mult[o]
            else:
                out_uncond += output[o] * mult[o]
                out_uncond_count += mult[o]
    return out_cond / out_count, out_uncond / out_uncond_count


def sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options):
    """``sampling_function_inner`` (``backend/sampling/sampling_function.py``) without sampler_cfg_function."""
    edit_strength = sum(item.get("strength", 1) for item in cond)
    if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False):
        uncond_ = None
    else:
        uncond_ = uncond
    for fn in model_options.get("sampler_pre_cfg_function", []):
        model, cond, uncond_, x, timestep, model_options = fn(model, cond, uncond_, x, timestep, model_options)
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)
    if not math.isclose(edit_strength, 1.0):
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
    """``backend/patcher/unet.UnetPatcher``: clone() deep-copies model_options; post-/pre-CFG functions
    append; the UNet function wrapper is one slot that the last setter owns."""

    def __init__(self, model: ForgeModel) -> None:
        self.model = model
        self.model_options: dict = {"transformer_options": {}}

    def clone(self) -> UnetPatcher:
        other = UnetPatcher(self.model)
        other.model_options = copy.deepcopy(self.model_options)
        return other

    def set_model_sampler_post_cfg_function(self, fn, disable_cfg1_optimization=False):
        self.model_options["sampler_post_cfg_function"] = [*self.model_options.get("sampler_post_cfg_function", []), fn]
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def add_sampler_pre_cfg_function(self, modifier, ensure_uniqueness=False):
        functions = self.model_options.setdefault("sampler_pre_cfg_function", [])
        if not (ensure_uniqueness and modifier in functions):
            functions.append(modifier)

    def set_model_unet_function_wrapper(self, unet_wrapper_function):
        self.model_options["model_function_wrapper"] = unet_wrapper_function


def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options):
    """``sampling_function`` after the conds are compiled: each conditioning modifier in turn (Reference's
    runs a nested ``sampling_function_inner`` on its own latents there), then the step's own call."""
    for modifier in model_options.get("conditioning_modifiers", []):
        model, x, timestep, uncond, cond, cond_scale, model_options, _ = modifier(
            model, x, timestep, uncond, cond, cond_scale, model_options, None
        )
    return sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options)


class ReferenceLike:
    """Forge's Reference preprocessor (``forge_preprocessor_reference/scripts/forge_reference.py``) reduced
    to its per-call state: a conditioning modifier runs a nested cond-only sampling call on noised reference
    latents while ``recording``; its ``attn1`` patch on every layer stores that call's keys/values per layer,
    and in the step's own call concatenates them to the cond rows' keys/values (``zero_cat`` on the token
    axis), which only works when the recorded batch has as many rows as the call's cond rows."""

    def __init__(self, unet_patcher: UnetPatcher, reference: torch.Tensor, layers) -> None:
        self.reference = reference
        self.recording = False
        self.recorded: dict = {}

        # Closures, as the real one installs (a bound method would be deep-copied with its state by clone()).
        def conditioning_modifier(*args):
            return self.conditioning_modifier(*args)

        def attn1_proc(q, k, v, extra):
            return self.attn1_proc(q, k, v, extra)

        options = unet_patcher.model_options
        options.setdefault("conditioning_modifiers", []).append(conditioning_modifier)
        replace = options["transformer_options"].setdefault("patches_replace", {}).setdefault("attn1", {})
        for key in layers:
            replace[key] = attn1_proc

    def conditioning_modifier(self, model, x, timestep, uncond, cond, cond_scale, model_options, seed):
        self.recording = True
        xt = self.reference + timestep[:, None, None, None] * 0.5
        sampling_function_inner(model, xt, timestep, uncond, cond, 1, model_options)
        self.recording = False
        return model, x, timestep, uncond, cond, cond_scale, model_options, seed

    def attn1_proc(self, q, k, v, extra):
        location = (*extra["block"], extra["block_index"])
        if self.recording:
            self.recorded[location] = (k, v)
            return forge_attention(q, k, v, extra["n_heads"])
        cond, uncond = extra["cond_indices"], extra["uncond_indices"]
        k_r, v_r = self.recorded[location]
        out = torch.zeros_like(q)
        keys, values = torch.cat([k[cond], k_r], 1), torch.cat([v[cond], v_r], 1)
        out[cond] = forge_attention(q[cond], keys, values, extra["n_heads"])
        if uncond:
            out[uncond] = forge_attention(q[uncond], k[uncond], v[uncond], extra["n_heads"])
        return out
