"""SEG on Forge Neo, on stand-ins of what Neo changes from Forge main, written from /work/notes/neo.md (no
snapshot of Neo's branch; the notes compare its N-2.26 and index sources with Forge main ``dfdcbab6``):

- ``sampling_function(..., extra_model_options)``: ``join_dicts(unet.model_options, extra)``, a new top-level
  dict each step (dicts merged, lists concatenated base + extra, the rest overwritten), handed to the
  pre-/post-CFG functions instead of the patcher's own;
- post-CFG args carry ``cond_scale``;
- ``KDiffusionSampler.sample`` writes the whole schedule into the current patcher's (SEG's clone's)
  ``transformer_options["sampling_sigmas"]`` after ``process_before_every_sampling``;
- ``ModelPatcher.clone()`` recreates only dicts and lists (``utils.deepcopy_``), functions are shared;
- ``KModel.memory_required`` is ComfyUI's (``area * 0.15 * memory_usage_factor * 2**20`` without xformers);
- ``sd_forge_compile`` replaces ``kmodel.apply_model`` by a ``functools.wraps`` wrapper, keeping the
  original as ``kmodel._orig_apply_model``.

``calc_cond_uncond_batch`` and the UNet forward are main's (``tests.standins_forge``, ``standins_forge_unet``).
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import pytest
import torch

from seg_lib.core.params import BY_INFOTEXT, SegParams, to_infotext
from seg_lib.host.forge import ForgeHost, ForgeRun
from seg_lib.host.forge_fork import BACKEND, read_forward
from seg_lib.host.forge_host import Conventions, read_conventions
from seg_lib.host.run import RUN_ATTRIBUTE, on_cfg_denoiser
from tests import standins_forge_unet
from tests.standins import CONTEXT, make_p
from tests.standins_forge import ForgeModel, UnetPatcher, calc_cond_uncond_batch, forge_attention
from tests.standins_forge_unet import IntegratedUNet2DConditionModel
from tests.test_a1111_adapter import reference_smoothing

pytestmark = pytest.mark.usefixtures("float64")

STOCK = {IntegratedUNet2DConditionModel: read_forward(IntegratedUNet2DConditionModel, standins_forge_unet)}
COMPILED = "SEG is off for this generation: the UNet runs compiled"


def join_dicts(base: dict, extra: dict | None) -> dict:
    """``backend/utils.join_dicts``: a shallow copy of ``base``; ``extra`` merged in (dicts recursively,
    lists concatenated, anything else overwritten)."""
    joined = dict(base)
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(joined.get(key), dict):
            joined[key] = join_dicts(joined[key], value)
        elif isinstance(value, list) and isinstance(joined.get(key), list):
            joined[key] = joined[key] + value
        else:
            joined[key] = value
    return joined


def deepcopy_(value):
    """``backend/utils.deepcopy_``: dicts and lists recreated, every other object shared."""
    if isinstance(value, dict):
        return {k: deepcopy_(v) for k, v in value.items()}
    return [deepcopy_(v) for v in value] if isinstance(value, list) else value


class NeoModel(ForgeModel):
    memory_usage_factor = 1.0  # SD 1.5

    def memory_required(self, input_shape):
        return input_shape[0] * math.prod(input_shape[2:]) * 0.15 * self.memory_usage_factor * 2**20


class NeoPatcher(UnetPatcher):
    def clone(self) -> NeoPatcher:
        other = NeoPatcher(self.model)
        other.model_options = deepcopy_(self.model_options)
        return other


def sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options):
    """Main's (pre-CFG positional before the call), post-CFG args with ``cond_scale``."""
    edit_strength = sum(item.get("strength", 1) for item in cond)
    cfg1 = math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False)
    uncond_ = None if cfg1 else uncond
    for fn in model_options.get("sampler_pre_cfg_function", []):
        model, cond, uncond_, x, timestep, model_options = fn(model, cond, uncond_, x, timestep, model_options)
    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)
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


def sampling_function(unet, x, timestep, uncond, cond, cond_scale, extra_model_options=None):
    model, model_options = unet.model, join_dicts(unet.model_options, extra_model_options)
    for modifier in model_options.get("conditioning_modifiers", []):
        model, x, timestep, uncond, cond, cond_scale, model_options, _ = modifier(
            model, x, timestep, uncond, cond, cond_scale, model_options, None
        )
    return sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options)


def conventions() -> Conventions:
    """Read from Neo's functions as from any host: its sampling function and batching are main's in shape."""
    return read_conventions(
        sampling_function_inner,
        calc_cond_uncond_batch,
        [standins_forge_unet.TimestepEmbedSequential.forward],
        standins_forge_unet.SpatialTransformer.forward,
    )


def test_neo_reads_as_forge_main():
    assert conventions() == Conventions()  # positional pre-CFG, no cond-batch hook, inner modifiers, factor 1
    assert STOCK[IntegratedUNet2DConditionModel] is BACKEND


class NeoRig:
    """One generation on Neo's flow: main's UNet layout and forward, Neo's model, patcher and sampling."""

    def __init__(self, params, *, fast=True, batch=2, seed=0) -> None:
        torch.manual_seed(seed)
        self.unet = IntegratedUNet2DConditionModel(in_channels=8, adm_in=5).eval()
        self.model = NeoModel(self.unet)
        self.base = NeoPatcher(self.model)
        self.p = make_p()
        self.p.sd_model = SimpleNamespace(forge_objects=SimpleNamespace(unet=self.base))
        self.seen: list[int] = []
        self.unet.input_blocks[0].register_forward_pre_hook(lambda _m, a: self.seen.append(a[0].shape[0]))
        self.run = None
        if params is not None:
            self.p.extra_generation_params.update(to_infotext(params))
            opts = SimpleNamespace(seg_fast_path=fast)
            memory = self.model.memory.get_free_memory
            host = ForgeHost(calc_cond_uncond_batch, forge_attention, memory, opts, STOCK, conventions())
            self.run = ForgeRun(self.p, params, host=host)
            setattr(self.p, RUN_ATTRIBUTE, self.run)
        gen = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(batch, 4, 11, 7, generator=gen)
        self.sigma = torch.linspace(1.5, 2.0, batch)
        self.schedule = torch.linspace(14.6, 0.0, 21)
        concat = torch.randn(batch, 4, 11, 7, generator=gen)
        self.cond, self.uncond = (
            [{"model_conds": {"c_crossattn": torch.randn(batch, 3, CONTEXT, generator=gen), "c_concat": concat,
                              "y": torch.randn(batch, 5, generator=gen)}}]
            for _ in range(2)
        )  # fmt: skip

    def begin_sampling(self) -> None:
        """``process_before_every_sampling`` (SEG's patch), then Neo's sampler writes the schedule."""
        self.run.patch(self.p)
        self.p.sd_model.forge_objects.unet.model_options["transformer_options"]["sampling_sigmas"] = self.schedule

    def step(self, cond_scale=5.0, extra=None):
        denoiser = SimpleNamespace(p=self.p)
        on_cfg_denoiser(SimpleNamespace(denoiser=denoiser, sampling_step=0, total_sampling_steps=1, x=self.x))
        with torch.no_grad():
            unet = self.p.sd_model.forge_objects.unet
            return sampling_function(unet, self.x, self.sigma, self.uncond, self.cond, cond_scale, extra)

    def predict(self, names=(), sigma=math.inf):
        with torch.no_grad(), reference_smoothing(self.unet, list(names), sigma):
            return calc_cond_uncond_batch(NeoModel(self.unet), self.cond, None, self.x, self.sigma, {})[0]

    def plain(self, cond_scale=5.0):
        with torch.no_grad():
            unet = NeoPatcher(NeoModel(self.unet))
            return sampling_function(unet, self.x, self.sigma, self.uncond, self.cond, cond_scale)


@pytest.mark.parametrize(("layers", "names"), [("m0", ["m0"]), ("d0,u2", ["d0", "u2"])])
@pytest.mark.parametrize("sigma", [2.0, math.inf])
def test_the_fast_path_engages_with_sampling_sigmas(layers, names, sigma, capsys):
    params = SegParams(enabled=True, scale=3.0, blur_sigma=sigma, layers=layers)
    fast, slow = NeoRig(params), NeoRig(params, fast=False)
    captured = {}

    def capture(h, hsp, options):  # a row-wise output block patch: rides along in the same call
        captured.update(options)
        return h, hsp

    for rig in (fast, slow):
        rig.base.model_options["transformer_options"]["patches"] = {"output_block_patch": [capture]}
        rig.begin_sampling()
    result = fast.step()
    assert captured["sampling_sigmas"] is fast.schedule  # the UNet call carried Neo's key
    assert (fast.model.calls, fast.seen) == ([6], [4])  # forked: one call, the encoder on the host's rows
    torch.testing.assert_close(result, slow.step(), rtol=1e-9, atol=1e-9)
    delta = fast.predict() - fast.predict(names, sigma)
    assert delta.abs().max() > 1e-4
    torch.testing.assert_close(result, fast.plain() + 3.0 * delta, rtol=1e-9, atol=1e-9)
    out = capsys.readouterr().out
    assert "same UNet call (forked from the conditional branch at" in out
    assert "transformer options SEG does not know" not in out


def test_extra_model_options_are_joined_and_their_post_cfg_runs_after_segs():
    """A CFG++ sampler's recorder comes in the extra options: concatenated after SEG's post-CFG function, it
    sees SEG's result; the pre-/post-CFG functions get the joined copy, the patcher's dict stays as it was."""
    rig = NeoRig(SegParams(enabled=True))
    rig.begin_sampling()
    patched = rig.p.sd_model.forge_objects.unet
    before = {key: list(value) for key, value in patched.model_options.items() if isinstance(value, list)}
    recorded = []

    def recorder(args):
        recorded.append((args["denoised"], args["cond_scale"], args["model_options"]))
        return args["denoised"]

    extra = {"sampler_post_cfg_function": [recorder], "disable_cfg1_optimization": True}
    result = rig.step(extra=extra)
    assert rig.model.calls == [6]
    denoised, cond_scale, options = recorded[0]
    assert denoised is result
    assert cond_scale == 5.0
    assert options is not patched.model_options
    assert options["sampler_post_cfg_function"][-1] is recorder
    assert {key: patched.model_options[key] for key in before} == before
    torch.testing.assert_close(result, rig.plain() + 3.0 * (rig.predict() - rig.predict(["m0"])), rtol=1e-9, atol=1e-9)


def test_the_memory_test_is_the_models_own(capsys):
    """Neo's estimate (ComfyUI's) says 3 rows need more than main's would: SEG asks the model, not a formula."""
    rig = NeoRig(SegParams(enabled=True), batch=1)
    main_estimate = ForgeModel(rig.unet).memory_required([3, 4, 11, 7])
    rig.model.memory.free = rig.model.memory_required([3, 4, 11, 7])
    assert main_estimate < rig.model.memory.free
    rig.begin_sampling()
    rig.step()
    assert rig.model.calls == [2, 1]
    assert "(not enough free memory for the bigger batch)" in capsys.readouterr().out
    rig = NeoRig(SegParams(enabled=True), batch=1)
    rig.model.memory.free = rig.model.memory_required([3, 4, 11, 7]) + 1
    rig.begin_sampling()
    rig.step()
    assert rig.model.calls == [3]


def test_a_later_clone_that_shares_functions_keeps_the_same_call():
    rig = NeoRig(SegParams(enabled=True), batch=1)
    rig.begin_sampling()
    patched = rig.p.sd_model.forge_objects.unet
    clone = patched.clone()
    assert clone.model_options["transformer_options"] is not patched.model_options["transformer_options"]
    assert clone.model_options["transformer_options"]["sampling_sigmas"] is rig.schedule  # shared, not copied
    rig.p.sd_model.forge_objects.unet = clone
    result = rig.step()
    assert rig.model.calls == [3]
    torch.testing.assert_close(result, rig.plain() + 3.0 * (rig.predict() - rig.predict(["m0"])), rtol=1e-9, atol=1e-9)


def compile_like(kmodel) -> None:
    """``sd_forge_compile``: ``apply_model`` replaced by a plain function made with ``functools.wraps``."""
    original = kmodel.apply_model

    @functools.wraps(original)
    def apply_model_with_compile(*args, **kwargs):
        return original(*args, **kwargs)

    apply_model_with_compile.forge_compiled = True
    kmodel.apply_model = apply_model_with_compile
    kmodel._orig_apply_model = original


@pytest.mark.parametrize("order", ["before SEG's patch", "after SEG's patch"])
def test_a_compiled_unet_makes_seg_give_up_with_one_line(order, capsys):
    params = SegParams(enabled=True)
    rig = NeoRig(params)
    if order == "before SEG's patch":
        compile_like(rig.model)
    rig.begin_sampling()
    if order == "after SEG's patch":
        compile_like(rig.model)
    rig.run.begin_batch()
    for _ in range(2):
        torch.testing.assert_close(rig.step(), rig.plain(), rtol=0, atol=0)
    assert rig.model.calls == [4, 4]  # the host's own calls only
    assert not set(BY_INFOTEXT) & set(rig.p.extra_generation_params)
    rig.run.end_batch()
    out = capsys.readouterr().out
    assert out.count(COMPILED) == 1
    assert out.count("[SEG]") == 1
