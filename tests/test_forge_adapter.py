"""The Forge adapter against stand-ins of Forge's UNet patcher, replace-patch protocol and sampling flow."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from seg_lib.core.params import SegParams, to_infotext
from seg_lib.host.forge import ALL_ROWS, SMOOTH_ROWS, ForgeHost, ForgeRun, with_attn1_patches
from seg_lib.host.run import RUN_ATTRIBUTE, on_cfg_denoiser
from tests.standins import CONTEXT, make_p
from tests.standins_forge import (
    ControlStub,
    ForgeModel,
    ForgeTinyUNet,
    UnetPatcher,
    calc_cond_uncond_batch,
    forge_attention,
    sampling_function_inner,
)
from tests.test_a1111_adapter import reference_smoothing

pytestmark = pytest.mark.usefixtures("float64")

ADM = 5  # width of the SDXL-style ``y`` vector in the rigs that use one
SAME_LINE = "smoothed branch computed in the same UNet call"
SEPARATE_LINE = "[SEG] separate extra UNet call"


class ForgeRig:
    """One generation on the Forge stand-ins; ``extras`` adds an inpainting ``c_concat`` and an SDXL ``y``
    (tensors Forge puts in the UNet call's ``c``), distinct per image, so that rows that land in the wrong
    place show."""

    def __init__(
        self,
        params: SegParams | None,
        *,
        fast: bool = True,
        batch: int = 1,
        extras: bool = False,
        height: int = 11,
        width: int = 7,
        seed: int = 0,
    ) -> None:
        torch.manual_seed(seed)
        self.unet = ForgeTinyUNet(in_channels=8 if extras else 4, adm_in=ADM if extras else None).eval()
        self.model = ForgeModel(self.unet)
        self.p = make_p()
        self.p.sd_model = SimpleNamespace(forge_objects=SimpleNamespace(unet=UnetPatcher(self.model)))
        self.base = self.p.sd_model.forge_objects.unet
        self.opts = SimpleNamespace(seg_fast_path=fast)
        self.run = None
        if params is not None:
            self.p.extra_generation_params.update(to_infotext(params))
            host = ForgeHost(calc_cond_uncond_batch, forge_attention, self.model.memory.get_free_memory, self.opts)
            self.run = ForgeRun(self.p, params, host=host)
            setattr(self.p, RUN_ATTRIBUTE, self.run)
        gen = torch.Generator().manual_seed(seed + 1)
        self.x = torch.randn(batch, 4, height, width, generator=gen)
        self.sigma = torch.linspace(1.5, 2.0, batch)
        extra = {}
        if extras:
            extra = {"c_concat": torch.randn(batch, 4, height, width, generator=gen)}
        self.cond = [self.entry(gen, extra, extras)]
        self.uncond = [self.entry(gen, extra, extras)]

    def entry(self, gen: torch.Generator, extra: dict, adm: bool, strength: float | None = None) -> dict:
        conds = {"c_crossattn": torch.randn(self.x.shape[0], 3, CONTEXT, generator=gen), **extra}
        if adm:
            conds["y"] = torch.randn(self.x.shape[0], ADM, generator=gen)
        return {"model_conds": conds} if strength is None else {"model_conds": conds, "strength": strength}

    def step(self, step: int = 0, steps: int = 1, cond_scale: float = 5.0, cond=None) -> torch.Tensor:
        on_cfg_denoiser(
            SimpleNamespace(
                denoiser=SimpleNamespace(p=self.p), sampling_step=step, total_sampling_steps=steps, x=self.x
            )
        )
        unet = self.p.sd_model.forge_objects.unet
        with torch.no_grad():
            return sampling_function_inner(
                unet.model, self.x, self.sigma, self.uncond, cond or self.cond, cond_scale, unet.model_options
            )

    def predict(self, cond, names=(), sigma=math.inf, options=None) -> torch.Tensor:
        """The conditional prediction on a fresh model, the named layers blurred by the reference hooks."""
        with torch.no_grad(), reference_smoothing(self.unet, list(names), sigma):
            return calc_cond_uncond_batch(ForgeModel(self.unet), cond, None, self.x, self.sigma, options or {})[0]

    def plain(self, cond_scale: float = 5.0, cond=None) -> torch.Tensor:
        with torch.no_grad():
            return sampling_function_inner(
                ForgeModel(self.unet), self.x, self.sigma, self.uncond, cond or self.cond, cond_scale, {}
            )

    def rows_cost(self, rows: int) -> float:
        return self.model.memory_required([rows, *self.x.shape[1:]])


def observe_calls(rig: ForgeRig) -> dict:
    """Capture the transformer options of the UNet calls through an output block patch: a row-wise kind
    (FreeU's) that SEG lets ride along in the same call."""
    captured: dict = {}

    def capture(h, hsp, options):
        captured.update(options)
        return h, hsp

    rig.base.model_options["transformer_options"]["patches"] = {"output_block_patch": [capture]}
    return captured


def test_patch_clones_once_per_pass_and_leaves_the_pass_unet_alone():
    rig = ForgeRig(SegParams(enabled=True))
    rig.run.patch(rig.p)
    patched = rig.p.sd_model.forge_objects.unet
    assert patched is not rig.base
    assert rig.base.model_options == {"transformer_options": {}}
    rig.run.patch(rig.p)  # the hires pass calls process_before_every_sampling twice
    assert rig.p.sd_model.forge_objects.unet is patched
    for key in ("sampler_post_cfg_function", "sampler_pre_cfg_function"):
        assert len(patched.model_options[key]) == 1
    assert "model_function_wrapper" in patched.model_options
    rig.p.sd_model.forge_objects.unet = rig.base  # Forge resets forge_objects before the next pass
    rig.run.patch(rig.p)
    assert rig.p.sd_model.forge_objects.unet is not patched
    assert len(rig.p.sd_model.forge_objects.unet.model_options["sampler_post_cfg_function"]) == 1


def test_a_later_clone_keeps_the_same_call():
    """Extensions after SEG clone the patcher, which deep-copies model_options: what SEG put there must not
    be copied along with the run (a bound method would be, run and all)."""
    rig = ForgeRig(SegParams(enabled=True))
    rig.run.patch(rig.p)
    rig.p.sd_model.forge_objects.unet = rig.p.sd_model.forge_objects.unet.clone()
    result = rig.step()
    assert rig.model.calls == [3]
    torch.testing.assert_close(result, rig.plain() + 3.0 * (rig.predict(rig.cond) - rig.predict(rig.cond, ["m0"])))


def test_fast_path_off_installs_no_wrapper(capsys):
    """Off: the post-CFG function, and the pre-CFG function that tells the step's call from nested ones."""
    rig = ForgeRig(SegParams(enabled=True), fast=False)
    rig.run.patch(rig.p)
    options = rig.p.sd_model.forge_objects.unet.model_options
    assert set(options) == {"transformer_options", "sampler_post_cfg_function", "sampler_pre_cfg_function"}
    rig.step()
    assert rig.model.calls == [2, 1]  # cond + uncond, then the cond-only extra call
    assert f"{SEPARATE_LINE} (fast path off in Settings)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("layers", "names"), [("m0", ["m0"]), ("d0,u2", ["d0", "u2"]), ("input3,output2", ["d1", "u1"])]
)
@pytest.mark.parametrize("sigma", [2.0, math.inf])
@pytest.mark.parametrize("fast", [True, False])
def test_result_is_cfg_plus_seg_term(layers, names, sigma, fast):
    rig = ForgeRig(SegParams(enabled=True, scale=3.0, blur_sigma=sigma, layers=layers), fast=fast)
    rig.run.patch(rig.p)
    result = rig.step()
    delta = rig.predict(rig.cond) - rig.predict(rig.cond, names=names, sigma=sigma)
    assert delta.abs().max() > 1e-3  # the blur really acts
    torch.testing.assert_close(result, rig.plain() + 3.0 * delta, rtol=1e-9, atol=1e-9)
    # fast: one call with cond, uncond and the smoothed copy of cond; else cond + uncond, then cond alone
    assert rig.model.calls == ([3] if fast else [2, 1])


@pytest.mark.parametrize("layers", ["m0", "u0", "d0"])
@pytest.mark.parametrize("sigma", [2.0, math.inf])
def test_same_call_equals_separate_call(layers, sigma):
    """Two images with their own c_concat and y: the appended rows must be the cond chunk's, row for row."""
    params = SegParams(enabled=True, scale=3.0, blur_sigma=sigma, layers=layers)
    fast, slow = (ForgeRig(params, fast=f, batch=2, extras=True) for f in (True, False))
    for rig in (fast, slow):
        rig.run.patch(rig.p)
    result = fast.step()
    torch.testing.assert_close(result, slow.step(), rtol=1e-9, atol=1e-9)
    assert (result - fast.plain()).abs().max() > 1e-3  # SEG changed the image
    assert fast.model.calls == [6]  # 2 images x (uncond, cond, smoothed cond) in the host's one call
    assert slow.model.calls == [4, 2]


@pytest.mark.parametrize("fast", [True, False])
def test_condition_free_at_cfg_one(fast):
    rig = ForgeRig(SegParams(enabled=True, scale=2.0), fast=fast)
    rig.run.patch(rig.p)
    result = rig.step(cond_scale=1.0)
    cond = rig.predict(rig.cond)
    expected = cond + 2.0 * (cond - rig.predict(rig.cond, names=["m0"]))
    torch.testing.assert_close(result, expected, rtol=1e-9, atol=1e-9)
    assert rig.model.calls == ([2] if fast else [1, 1])


@pytest.mark.parametrize("fast", [True, False])
def test_and_prompt_strengths_scale_like_cfg_and_take_the_separate_call(fast, capsys):
    rig = ForgeRig(SegParams(enabled=True), fast=fast)
    gen = torch.Generator().manual_seed(9)
    cond = [rig.entry(gen, {}, False, strength=1.0) for _ in range(2)]
    rig.run.patch(rig.p)
    result = rig.step(cond=cond)
    delta = rig.predict(cond) - rig.predict(cond, names=["m0"])
    torch.testing.assert_close(result, rig.plain(cond=cond) + 3.0 * 2.0 * delta, rtol=1e-9, atol=1e-9)
    assert rig.model.calls == [3, 2]  # both AND parts and uncond, then both AND parts smoothed
    if fast:
        assert f"{SEPARATE_LINE} (the prompt has several AND parts)" in capsys.readouterr().out


def test_controlnet_control_takes_the_separate_call(capsys):
    fast, slow = (ForgeRig(SegParams(enabled=True), fast=f) for f in (True, False))
    controls = []
    for rig in (fast, slow):
        control = ControlStub()  # Forge gives every cond and uncond entry the ControlNet linked list
        for entry in rig.cond + rig.uncond:
            entry["control"] = control
        controls.append(control)
        rig.run.patch(rig.p)
    torch.testing.assert_close(fast.step(), slow.step(), rtol=0, atol=0)
    assert fast.model.calls == [2, 1]
    assert controls[0].batched == [2, 1]  # ControlNet ran for the rows it was asked about, nothing more
    assert (
        f"{SEPARATE_LINE} (the UNet call carries 'control', 'control_model' (ControlNet?))" in capsys.readouterr().out
    )


def test_too_little_memory_takes_the_separate_call(capsys):
    rig = ForgeRig(SegParams(enabled=True))
    rig.model.memory.free = rig.rows_cost(3)  # cond + uncond fit, a third chunk does not (the host's "<")
    rig.run.patch(rig.p)
    result = rig.step()
    assert rig.model.calls == [2, 1]
    torch.testing.assert_close(result, rig.plain() + 3.0 * (rig.predict(rig.cond) - rig.predict(rig.cond, ["m0"])))
    assert f"{SEPARATE_LINE} (not enough free memory for the bigger batch)" in capsys.readouterr().out


def test_when_forge_splits_cond_and_uncond_the_extra_rows_do_not_fit_either():
    rig = ForgeRig(SegParams(enabled=True))
    rig.model.memory.free = rig.rows_cost(2)  # one row fits, two do not: Forge runs uncond, then cond
    rig.run.patch(rig.p)
    result = rig.step()
    assert rig.model.calls == [1, 1, 1]  # uncond alone, cond alone (SEG stays armed for it), the extra call
    torch.testing.assert_close(result, rig.plain() + 3.0 * (rig.predict(rig.cond) - rig.predict(rig.cond, ["m0"])))


def test_another_wrapper_is_chained_and_only_sees_calls_of_the_hosts_shape(capsys):
    """A UNet function wrapper of another extension may regroup rows (MultiDiffusion's tiles): SEG cannot
    vouch for its rows, so it keeps it in the chain and makes the separate call through it."""
    rig = ForgeRig(SegParams(enabled=True), batch=2, extras=True)
    seen = []

    def other_extension(apply_model, args):
        c = args["c"]
        seen.append(
            (args["input"].shape[0], list(args["cond_or_uncond"]), {k: c[k].shape[0] for k in ("c_crossattn", "y")})
        )
        return apply_model(args["input"], args["timestep"], **c)

    rig.base.set_model_unet_function_wrapper(other_extension)
    reference = ForgeRig(SegParams(enabled=True), batch=2, extras=True)
    for r in (rig, reference):
        r.run.patch(r.p)
    torch.testing.assert_close(rig.step(), reference.step(), rtol=1e-9, atol=1e-9)
    assert seen == [(4, [1, 0], {"c_crossattn": 4, "y": 4}), (2, [0], {"c_crossattn": 2, "y": 2})]
    assert "separate extra UNet call (another UNet function wrapper (test_forge_adapter.other_extension" in (
        capsys.readouterr().out
    )


def test_moving_the_wrapper_moves_the_chained_one():
    """Forge's ``model_patches_to`` replaces a wrapper that has ``.to`` by what ``.to`` returns."""
    rig = ForgeRig(SegParams(enabled=True))
    moves = []

    class Movable:
        def __call__(self, apply_model, args):
            moves.append(("call", args["input"].shape[0]))
            return apply_model(args["input"], args["timestep"], **args["c"])

        def to(self, device):
            moves.append(("to", device))
            return Movable()

    rig.base.set_model_unet_function_wrapper(Movable())
    rig.run.patch(rig.p)
    options = rig.p.sd_model.forge_objects.unet.model_options
    options["model_function_wrapper"] = options["model_function_wrapper"].to("cpu")
    rig.step()
    assert moves == [("to", "cpu"), ("call", 2), ("call", 1)]  # the host's call, then SEG's separate one


def test_batch_regrouping_wrapper_falls_back_to_the_separate_call(capsys):
    """A wrapper that runs the batch a row at a time (like tiled diffusion's tile batches): the marked rows
    are not where SEG put them, so nothing from that call is used."""
    rig = ForgeRig(SegParams(enabled=True))

    def row_by_row(apply_model, args):
        c = args["c"]
        outputs = []
        for row in range(args["input"].shape[0]):
            one = {k: (v if k == "transformer_options" else v[row : row + 1]) for k, v in c.items()}
            outputs.append(apply_model(args["input"][row : row + 1], args["timestep"][row : row + 1], **one))
        return torch.cat(outputs)

    rig.base.set_model_unet_function_wrapper(row_by_row)
    rig.run.patch(rig.p)
    result = rig.step()
    torch.testing.assert_close(result, rig.plain() + 3.0 * (rig.predict(rig.cond) - rig.predict(rig.cond, ["m0"])))
    assert rig.model.calls == [1, 1, 1]  # the host's two rows one by one, then the separate call
    out = capsys.readouterr().out
    assert f"{SEPARATE_LINE} (another UNet function wrapper (test_forge_adapter.row_by_row; MultiDiffusion?))" in out


def test_the_host_rows_are_never_smoothed():
    rig = ForgeRig(SegParams(enabled=True, layers="d0,m0,u2"), batch=2, extras=True)
    seen = {}

    def before_seg(args):  # installed before SEG, so it sees the host's own cond/uncond predictions
        seen.update(cond=args["cond_denoised"], uncond=args["uncond_denoised"])
        return args["denoised"]

    captured = observe_calls(rig)
    rig.base.set_model_sampler_post_cfg_function(before_seg)
    rig.run.patch(rig.p)
    rig.step()
    assert rig.model.calls == [6]
    torch.testing.assert_close(seen["cond"], rig.predict(rig.cond), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(seen["uncond"], rig.predict(rig.uncond), rtol=1e-12, atol=1e-12)
    assert captured[SMOOTH_ROWS] == slice(4, 6)
    # SEG's patches without a marker smooth nothing; with one they do (so the check above can fail).
    patches = captured["patches_replace"]["attn1"]
    probe = {"transformer_options": {"block_inner_modifiers": captured["block_inner_modifiers"]}}  # the grid
    unmarked = with_attn1_patches(probe, patches, rows=None)
    torch.testing.assert_close(rig.predict(rig.cond, options=unmarked), rig.predict(rig.cond), rtol=0, atol=0)
    marked = with_attn1_patches(probe, patches)
    assert (rig.predict(rig.cond, options=marked) - rig.predict(rig.cond)).abs().max() > 1e-3


def test_the_host_bookkeeping_covers_the_appended_rows():
    rig = ForgeRig(SegParams(enabled=True), batch=2)
    captured = observe_calls(rig)
    rig.run.patch(rig.p)
    rig.step()
    assert captured["cond_or_uncond"] == [1, 0, 0]
    assert captured["cond_mark"].tolist() == [1, 1, 0, 0, 0, 0]
    assert captured["cond_indices"] == [2, 3, 4, 5]
    assert captured["uncond_indices"] == [0, 1]
    options = rig.p.sd_model.forge_objects.unet.model_options["transformer_options"]
    assert set(options) == {"patches", "block_inner_modifiers"}  # SEG's own grid probe; the rest are copies


@pytest.mark.parametrize(("fast", "sag"), [(True, True), (True, False), (False, True)])
def test_another_extensions_patch_on_the_same_layer_still_runs_on_every_row(fast, sag):
    """SAG has an attn1 replace patch at ("middle", 0, 0), where SEG's m0 sits on SD1.5, and records the
    uncond rows' attention there: it must still see every row of the host's call. SAG's patch is known to
    be row-wise, so the smoothed rows may ride in the host's call; an unknown replace patch means the
    separate call (it could keep state from call to call, as Reference's does)."""
    rig = ForgeRig(SegParams(enabled=True, layers="m0"), fast=fast)
    seen = []

    def attn_and_record(q, k, v, extra):
        seen.append((q.shape[0], list(extra["cond_or_uncond"])))
        return forge_attention(q, k, v, extra["n_heads"])

    record = attn_and_record
    if sag:  # what Forge's SAG script's patch looks like (its module is the script file forge_sag.py)
        record.__module__ = "forge_sag.py"  # the WebUIs name script modules after their file
        record.__qualname__ = "SelfAttentionGuidance.patch.<locals>.attn_and_record"
    rig.base.model_options["transformer_options"]["patches_replace"] = {"attn1": {("middle", 0): record}}
    rig.run.patch(rig.p)
    expected = rig.plain() + 3.0 * (rig.predict(rig.cond) - rig.predict(rig.cond, ["m0"]))
    torch.testing.assert_close(rig.step(), expected, rtol=1e-9, atol=1e-9)
    # both middle transformers; fast: one call with the appended cond chunk, else the host's, then SEG's
    assert seen == ([(3, [1, 0, 0])] * 2 if fast and sag else [(2, [1, 0])] * 2 + [(1, [0])] * 2)


def test_another_post_cfg_pass_in_the_step_is_left_alone():
    """A guidance extension that runs the cond branch again from its post-CFG function (as PAG does) gets
    its call as it asked for it, and SEG still uses the rows from the host's own call."""
    rig = ForgeRig(SegParams(enabled=True))

    def other_guidance(args):
        rig.run.host.calc_cond_uncond_batch(
            args["model"], args["cond"], None, args["input"], args["sigma"], args["model_options"]
        )
        return args["denoised"]

    rig.base.set_model_sampler_post_cfg_function(other_guidance)  # runs before SEG's
    rig.run.patch(rig.p)
    result = rig.step()
    assert rig.model.calls == [3, 1]
    torch.testing.assert_close(result, rig.plain() + 3.0 * (rig.predict(rig.cond) - rig.predict(rig.cond, ["m0"])))


@pytest.mark.parametrize("fast", [True, False])
def test_the_path_is_said_once_per_generation(fast, capsys):
    rig = ForgeRig(SegParams(enabled=True), fast=fast)
    rig.run.patch(rig.p)
    for step in range(3):
        rig.step(step=step, steps=3)
    out = capsys.readouterr().out
    assert out.count(SAME_LINE) == (1 if fast else 0)
    assert out.count(SEPARATE_LINE) == (0 if fast else 1)


@pytest.mark.parametrize("fast", [True, False])
def test_window_skips_the_extra_rows_outside(fast):
    rig = ForgeRig(SegParams(enabled=True, start=0.5, end=1.0), fast=fast)
    rig.run.patch(rig.p)
    for step in range(4):
        rig.step(step=step, steps=4)
    assert rig.model.calls == ([2, 2, 3, 3] if fast else [2, 2, 2, 1, 2, 1])  # steps 2 and 3 only


def test_model_without_unet_is_reported_once(capsys):
    rig = ForgeRig(SegParams(enabled=True))
    rig.base.model = SimpleNamespace(diffusion_model=torch.nn.Identity())  # a DiT (Flux, SD3)
    rig.run.patch(rig.p)
    rig.run.patch(rig.p)
    assert rig.p.sd_model.forge_objects.unet is rig.base
    assert capsys.readouterr().out.count("does not apply to this model yet") == 1
    assert rig.p.extra_generation_params == {}


def test_layers_the_model_lacks(capsys):
    rig = ForgeRig(SegParams(enabled=True, layers="u7"))
    rig.run.patch(rig.p)
    assert rig.p.sd_model.forge_objects.unet is rig.base
    assert "'u7' is not in this model" in capsys.readouterr().out


def test_an_error_in_the_separate_call_makes_the_image_without_seg(capsys):
    rig = ForgeRig(SegParams(enabled=True), fast=False)

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    rig.run.host.calc_cond_uncond_batch = broken
    rig.run.patch(rig.p)
    assert torch.equal(rig.step(), rig.plain())
    assert torch.equal(rig.step(), rig.plain())
    assert capsys.readouterr().out.count("SEG failed") == 1
    assert rig.p.extra_generation_params == {}


def test_an_error_in_the_bigger_call_falls_back_to_the_separate_call(capsys):
    """Something row-wise that still fails on the bigger batch: the host's call runs again as asked, SEG takes
    the separate call from then on, and the image keeps SEG."""
    rig = ForgeRig(SegParams(enabled=True))

    def cannot_take_more_rows(h, hsp, options):
        if h.shape[0] > 2:
            raise RuntimeError("boom")
        return h, hsp

    rig.base.model_options["transformer_options"]["patches"] = {"output_block_patch": [cannot_take_more_rows]}
    rig.run.patch(rig.p)
    expected = rig.plain() + 3.0 * (rig.predict(rig.cond) - rig.predict(rig.cond, ["m0"]))
    torch.testing.assert_close(rig.step(), expected)
    torch.testing.assert_close(rig.step(), expected)
    assert rig.model.calls == [3, 2, 1, 2, 1]  # the bigger call failed inside the UNet
    out = capsys.readouterr().out
    assert out.count("the same-call path failed (RuntimeError('boom'))") == 1
    assert out.count(f"{SEPARATE_LINE} (the same-call path failed earlier in this generation)") == 1
    assert "SEG failed" not in out
    assert rig.p.extra_generation_params != {}


def test_host_fits_uses_the_hosts_own_test():
    model = SimpleNamespace(memory_required=lambda shape: shape[0] * 10)
    host = ForgeHost(None, None, lambda device: 30)
    assert host.fits(model, (2, 4, 8, 8), torch.device("cpu"))
    assert not host.fits(model, (3, 4, 8, 8), torch.device("cpu"))  # 30 < 30 is false, as in Forge
    assert not ForgeHost(None, None).fits(model, (1, 4, 8, 8), torch.device("cpu"))  # no memory reading: never
    assert not host.fits(None, (1, 4, 8, 8), torch.device("cpu"))


def test_with_attn1_patches_copies_and_chains_what_it_shadows():
    options = {"transformer_options": {"patches_replace": {"attn1": {("input", 1): "x"}}, "other": 1}}
    merged = with_attn1_patches(options, {("middle", 0, 0): "y", ("input", 1, 0): print})
    attn1 = merged["transformer_options"]["patches_replace"]["attn1"]
    assert attn1[("middle", 0, 0)] == "y"
    assert attn1[("input", 1)] == "x"
    assert attn1[("input", 1, 0)].func is print  # shadows ("input", 1) for transformer 0: chained
    assert attn1[("input", 1, 0)].keywords == {"inner": "x"}
    assert merged["transformer_options"][SMOOTH_ROWS] == ALL_ROWS
    assert options["transformer_options"] == {"patches_replace": {"attn1": {("input", 1): "x"}}, "other": 1}
    assert SMOOTH_ROWS not in with_attn1_patches(options, {}, rows=None)["transformer_options"]
