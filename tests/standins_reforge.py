"""Stand-ins for the reForge pieces SEG touches beyond the UNet (``tests/standins_reforge_unet.py``), written
from reForge's source (``main`` ``3b56b268``):

- ``ldm_patched/modules/model_base.py``: ``BaseModel.apply_model`` (through the ``apply_model`` wrappers) and
  ``memory_required(input_shape, cond_shapes={})`` (the branch without xformers or flash attention);
- ``ldm_patched/modules/samplers.py``: ``_calc_cond_batch`` (chunks batched while ``memory_required(...,
  cond_shapes=...) * 1.5 < free``; per-call transformer_options copied with ``cond_or_uncond``, ``uuids``,
  ``sigmas``), ``calc_cond_batch`` (the ``calc_cond_batch`` wrappers), ``calc_cond_uncond_batch``,
  ``sampling_function`` (the ``sampler_calc_cond_batch_function`` hook, then the pre-CFG functions with one
  dict *after* the UNet call, ``x`` taken back from it) and ``cfg_function`` (post-CFG args with ``cond_scale``);
- ``modules_forge/forge_sampler.py`` (``forge_sample``: the conditioning modifiers, then ``sampling_function``),
  ``modules_forge/unet_patcher.py`` (clone deep-copies model_options), the inpaint preprocessor's pre-CFG
  (``forge_preprocessor_inpaint``) and Reference's nested call (``forge_preprocessor_reference``).

Conds hold plain tensors (``CONDRegular`` concatenates the same way); the model does not cast to float32 (the
tests run in float64). The UNet's names are re-exported, so that this module reads as the host's namespace.
"""

from __future__ import annotations

import collections
import copy
import math

import torch

from tests import standins_forge
from tests.standins_forge import MemoryManagement, _can_concat, forge_attention
from tests.standins_reforge_unet import (  # noqa: F401 (the UNet module's names, re-exported)
    DIFFUSION_MODEL,
    SpatialTransformer,
    TimestepEmbedSequential,
    UNetModel,
    WrapperExecutor,
    apply_control,
    forward_timestep_embed,
    get_all_wrappers,
    timestep_embedding,
)

COND, UNCOND = 0, 1
APPLY_MODEL, CALC_COND_BATCH = "apply_model", "calc_cond_batch"


# -- model_base.py ---------------------------------------------------------------------------------------------
class BaseModel:
    """``apply_model`` through the ``apply_model`` wrappers to ``_apply_model`` (c_concat on the channels,
    denoised ``x - sigma * eps``); ``memory_required`` sums the input's area and the shapes of the conds
    named in ``memory_usage_factor_conds`` (none for SD). ``calls``: rows per UNet call; ``asked``: the
    (input_shape, cond_shapes) it was asked about; ``memory``: what ``get_free_memory`` reports."""

    memory_usage_factor = 1.0
    memory_usage_factor_conds: tuple[str, ...] = ()

    def __init__(self, unet: UNetModel) -> None:
        self.diffusion_model = unet
        self.calls: list[int] = []
        self.asked: list[tuple[list, dict]] = []
        self.memory = MemoryManagement()

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        wrappers = get_all_wrappers(APPLY_MODEL, transformer_options)
        executor = WrapperExecutor(self._apply_model, self, wrappers)
        return executor.execute(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        self.calls.append(x.shape[0])
        xc = x if c_concat is None else torch.cat([x, c_concat], dim=1)
        eps = self.diffusion_model(
            xc, t, context=c_crossattn, control=control, transformer_options=transformer_options, **kwargs
        )
        return x - t[:, None, None, None] * eps

    def memory_required(self, input_shape, cond_shapes={}):  # noqa: B006
        self.asked.append((list(input_shape), {k: list(v) for k, v in cond_shapes.items()}))
        shapes = [input_shape, *(s for c in self.memory_usage_factor_conds for s in cond_shapes.get(c) or [])]
        area = sum(shape[0] * math.prod(shape[2:]) for shape in shapes)
        return area * 0.15 * self.memory_usage_factor * 1024 * 1024


# -- samplers.py -----------------------------------------------------------------------------------------------
Prepared = collections.namedtuple("Prepared", ["input_x", "mult", "conditioning", "control", "uuid"])


def _prepare(entry, x_in):
    """``get_area_and_mult`` for entries without area or mask (Forge's stand-in), with the entry's uuid."""
    return Prepared(*standins_forge._area_and_mult(entry, x_in), entry.get("uuid", 0))


def _copied(options):
    """``merge_nested_dicts({}, options)``: nested dicts and lists copied, everything else shared."""
    return {k: _copied(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v for k, v in options.items()}


def _calc_cond_batch(model, conds, x_in, timestep, model_options):
    out_conds = [torch.zeros_like(x_in) for _ in conds]
    out_counts = [torch.ones_like(x_in) * 1e-37 for _ in conds]
    to_run = [(_prepare(entry, x_in), i) for i, cond in enumerate(conds) if cond is not None for entry in cond]
    while to_run:
        first = to_run[0][0]
        to_batch_temp = [i for i, (prepared, _) in enumerate(to_run) if _can_concat(prepared, first)][::-1]
        to_batch = to_batch_temp[:1]
        free_memory = model.memory.get_free_memory(x_in.device)
        for i in range(1, len(to_batch_temp) + 1):
            batch_amount = to_batch_temp[: len(to_batch_temp) // i]
            input_shape = [len(batch_amount) * first.input_x.shape[0], *first.input_x.shape[1:]]
            cond_shapes = collections.defaultdict(list)
            for tt in batch_amount:
                for k, v in to_run[tt][0].conditioning.items():
                    cond_shapes[k].append(v.size())
            if model.memory_required(input_shape, cond_shapes=cond_shapes) * 1.5 < free_memory:
                to_batch = batch_amount
                break
        chosen = [to_run.pop(i) for i in to_batch]
        cond_or_uncond = [kind for _, kind in chosen]
        input_x = torch.cat([prepared.input_x for prepared, _ in chosen])
        c = {k: torch.cat([prepared.conditioning[k] for prepared, _ in chosen]) for k in first.conditioning}
        timestep_ = torch.cat([timestep] * len(chosen))
        transformer_options = _copied(model_options.get("transformer_options", {}))
        transformer_options["cond_or_uncond"] = cond_or_uncond[:]
        transformer_options["uuids"] = [prepared.uuid for prepared, _ in chosen]
        transformer_options["sigmas"] = timestep
        c["transformer_options"] = transformer_options
        control = chosen[-1][0].control
        if control is not None:
            c["control"] = control.get_control(input_x, timestep_, c, len(cond_or_uncond), transformer_options)
        if "model_function_wrapper" in model_options:
            args = {"input": input_x, "timestep": timestep_, "c": c, "cond_or_uncond": cond_or_uncond}
            output = model_options["model_function_wrapper"](model.apply_model, args).chunk(len(chosen))
        else:
            output = model.apply_model(input_x, timestep_, **c).chunk(len(chosen))
        for o, (prepared, kind) in enumerate(chosen):
            out_conds[kind] += output[o] * prepared.mult
            out_counts[kind] += prepared.mult
    return [out / count for out, count in zip(out_conds, out_counts, strict=True)]


def calc_cond_batch(model, conds, x_in, timestep, model_options):
    wrappers = get_all_wrappers(CALC_COND_BATCH, model_options, is_model_options=True)
    executor = WrapperExecutor(_calc_cond_batch, None, wrappers)
    return executor.execute(model, conds, x_in, timestep, model_options)


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    return tuple(calc_cond_batch(model, [cond, uncond], x_in, timestep, model_options))


def cfg_function(model, cond_pred, uncond_pred, cond_scale, x, timestep, model_options={}, cond=None, uncond=None):  # noqa: B006
    edit_strength = sum(item.get("strength", 1) for item in cond)
    if uncond_pred is None:
        cfg_result = cond_pred
    else:
        weight = cond_scale if math.isclose(edit_strength, 1.0) else cond_scale * edit_strength
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * weight
    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {
            "denoised": cfg_result, "cond": cond, "uncond": uncond, "cond_scale": cond_scale, "model": model,
            "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": timestep,
            "model_options": model_options, "input": x,
        }  # fmt: skip
        cfg_result = fn(args)
    return cfg_result


def sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options={}, seed=None):  # noqa: B006
    cfg1 = math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False)
    uncond_ = None if cfg1 else uncond
    conds = [cond, uncond_]
    if "sampler_calc_cond_batch_function" in model_options:
        args = {"conds": conds, "input": x, "sigma": timestep, "model": model, "model_options": model_options}
        out = model_options["sampler_calc_cond_batch_function"](args)
    else:
        out = calc_cond_batch(model, conds, x, timestep, model_options)
    for fn in model_options.get("sampler_pre_cfg_function", []):
        args = {
            "conds": conds, "conds_out": out, "cond_scale": cond_scale, "timestep": timestep, "input": x,
            "sigma": timestep, "model": model, "model_options": model_options,
        }  # fmt: skip
        out = fn(args)
        x = args["input"]
    return cfg_function(model, out[0], out[1], cond_scale, x, timestep, model_options, cond=cond, uncond=uncond_)


# -- modules_forge -----------------------------------------------------------------------------------------------
def forge_sample(unet, x, timestep, uncond, cond, cond_scale, seed=0):
    """``forge_sample`` after the conds are built: each conditioning modifier, then ``sampling_function``."""
    model, model_options = unet.model, unet.model_options
    for modifier in model_options.get("conditioning_modifiers", []):
        model, x, timestep, uncond, cond, cond_scale, model_options, seed = modifier(
            model, x, timestep, uncond, cond, cond_scale, model_options, seed
        )
    return sampling_function(model, x, timestep, uncond, cond, cond_scale, model_options, seed)


class UnetPatcher(standins_forge.UnetPatcher):
    """As Forge's (``clone()`` deep-copies model_options), with reForge's pre-CFG setter and block patches."""

    def clone(self) -> UnetPatcher:
        other = UnetPatcher(self.model)
        other.model_options = copy.deepcopy(self.model_options)
        return other

    def set_model_sampler_pre_cfg_function(self, fn, disable_cfg1_optimization=False):
        self.model_options["sampler_pre_cfg_function"] = [*self.model_options.get("sampler_pre_cfg_function", []), fn]
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_patch(self, patch, name):
        patches = self.model_options["transformer_options"].setdefault("patches", {})
        patches[name] = [*patches.get(name, []), patch]


def inpaint_pre_cfg(latent: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor):
    """The inpaint-only preprocessor's pre-CFG (``forge_preprocessor_inpaint``): the area outside ``mask`` is
    replaced by the noised image latent in ``args["input"]``; the conds' output is returned as it was. Its
    noise is drawn per call there; here it is given, so that a test can compute the same."""

    def pre_cfg(args):
        x = args["input"]
        noisy = latent + args["timestep"][:, None, None, None] * noise
        args["input"] = x * mask + noisy * (1.0 - mask)
        return args["conds_out"]

    return pre_cfg


class ReferenceLike:
    """reForge's Reference (``forge_preprocessor_reference/scripts/forge_reference.py``) reduced to its
    per-call state: a conditioning modifier runs a nested ``sampling_function`` (CFG 1) on noised reference
    latents while ``recording``; its ``attn1`` patch on every layer stores that call's keys/values, and in
    later calls the cond chunks attend to their own and the recorded ones. The chunks are found from
    ``cond_or_uncond`` (reForge's per-call options carry no row indices), so one image per batch."""

    def __init__(self, unet: UnetPatcher, reference: torch.Tensor, layers) -> None:
        self.reference, self.recording, self.recorded = reference, False, {}

        def conditioning_modifier(model, x, timestep, uncond, cond, cond_scale, model_options, seed):
            self.recording = True
            sampling_function(model, self.reference + 0.5 * timestep[:, None, None, None], timestep, uncond, cond, 1,
                              model_options, seed)  # fmt: skip
            self.recording = False
            return model, x, timestep, uncond, cond, cond_scale, model_options, seed

        def attn1_proc(q, k, v, extra):
            location = (*extra["block"], extra["block_index"])
            if self.recording:
                self.recorded[location] = (k, v)
                return forge_attention(q, k, v, extra["n_heads"])
            k_r, v_r = self.recorded[location]
            outs = []
            for chunk, kind in enumerate(extra["cond_or_uncond"]):
                q_, k_, v_ = q[chunk : chunk + 1], k[chunk : chunk + 1], v[chunk : chunk + 1]
                if kind == COND:
                    k_, v_ = torch.cat([k_, k_r], 1), torch.cat([v_, v_r], 1)
                outs.append(forge_attention(q_, k_, v_, extra["n_heads"]))
            return torch.cat(outs)

        unet.model_options.setdefault("conditioning_modifiers", []).append(conditioning_modifier)
        replace = unet.model_options["transformer_options"].setdefault("patches_replace", {})
        replace["attn1"] = {**replace.get("attn1", {}), **dict.fromkeys(layers, attn1_proc)}
