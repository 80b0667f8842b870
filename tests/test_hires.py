"""Hires fix control (same / off / override) per sampling pass, and rescale through both host adapters."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from seg_lib.core.params import SegParams, for_pass, to_infotext
from seg_lib.generation import params_for_generation
from seg_lib.host.adapter import A1111Adapter, ForgeAdapter
from seg_lib.host.run import RUN_ATTRIBUTE, Run
from tests.standins import make_p
from tests.test_a1111_adapter import Rig
from tests.test_forge_adapter import ForgeRig
from tests.test_rescale import _direct_snf, _direct_std_rescale

pytestmark = pytest.mark.usefixtures("float64")

OVERRIDE = SegParams(
    True, 3.0, math.inf, "m0", hires="override", hires_scale=6.0, hires_blur_sigma=2.0, hires_layers="u0"
)


def test_for_pass():
    same = SegParams(True, 2.0)
    assert for_pass(same, False) is same
    assert for_pass(same, True) is same
    off = SegParams(True, 2.0, hires="off")
    assert for_pass(off, False) is off
    assert for_pass(off, True) is None
    first, hires = for_pass(OVERRIDE, False), for_pass(OVERRIDE, True)
    assert (first.scale, first.blur_sigma, first.layers) == (3.0, math.inf, "m0")
    assert (hires.scale, hires.blur_sigma, hires.layers) == (6.0, 2.0, "u0")
    assert (hires.start, hires.end, hires.rescale) == (first.start, first.end, first.rescale)
    assert for_pass(SegParams(), False) is None


def _hires_p(enable_hr: bool) -> SimpleNamespace:
    p = make_p()
    p.enable_hr = enable_hr
    return p


def _guided(p, args, passes=("first",)) -> dict:
    """The infotext after the named passes each had a guided step."""
    run = Run(p, params_for_generation(p, args))
    run.begin_batch()
    for name in passes:
        p.is_hr_pass = name == "hires"
        run.note_guided()
    return p.extra_generation_params


def test_hires_infotext_only_with_hires_fix_and_a_non_default_setting():
    args = [True, 3.0, "inf", "m0", 0.0, 1.0, 0.0, "full", "override", 6.0, "2", "u0"]
    with_hr = _guided(_hires_p(True), args, ("first", "hires"))
    assert with_hr["SEG Hires"] == "override"
    assert with_hr["SEG Hires Scale"] == "6.0"
    assert with_hr["SEG Hires Sigma"] == "2.0"
    assert with_hr["SEG Hires Layers"] == "u0"
    without = _guided(_hires_p(False), args)
    assert not any(key.startswith("SEG Hires") for key in without)
    default = _guided(_hires_p(True), [True], ("first", "hires"))
    assert not any(key.startswith("SEG Hires") for key in default)
    off = _guided(_hires_p(True), [True, 3.0, "inf", "m0", 0.0, 1.0, 0.0, "full", "off"])
    assert off["SEG Hires"] == "off"
    assert "SEG Hires Scale" not in off


@pytest.mark.parametrize("hires", ["same", "override"])
def test_a_hires_pass_that_guided_nothing_says_seg_was_off_there(hires):
    """Until the hires pass has had a guided step, the infotext says SEG was off in it (and only then)."""
    args = [True, 3.0, "inf", "m0", 0.0, 1.0, 0.0, "full", hires, 6.0, "2", "u0"]
    first_only = _guided(_hires_p(True), args)
    assert first_only["SEG Hires"] == "off"
    assert "SEG Hires Scale" not in first_only
    assert first_only["SEG Scale"] == "3.0"
    assert ("SEG Hires" in _guided(_hires_p(True), args, ("first", "hires"))) == (hires == "override")


# -- A1111 ----------------------------------------------------------------------------------------------------
def _a1111_expected(rig: Rig, names: list[str], sigma: float, scale: float) -> torch.Tensor:
    rows = torch.stack(rig.cond)
    x0 = rig.predict(rig.x, rig.sigma, rows)
    return rig.plain() + scale * (x0 - rig.predict(rig.x, rig.sigma, rows, names=names, sigma=sigma))


@pytest.mark.parametrize("fast", [True, False])
def test_a1111_override_uses_the_hires_settings_in_the_hires_pass_only(fast):
    rig = Rig(OVERRIDE, fast=fast)
    first = rig.step()
    torch.testing.assert_close(first, _a1111_expected(rig, ["m0"], math.inf, 3.0), rtol=1e-9, atol=1e-9)
    rig.p.is_hr_pass = True  # A1111 sets it for the hires pass, which gets a new sampler and denoiser
    rig.denoiser = type(rig.denoiser)(rig.inner, rig.p, rig.denoiser.callback)
    hires = rig.step()
    torch.testing.assert_close(hires, _a1111_expected(rig, ["u0"], 2.0, 6.0), rtol=1e-9, atol=1e-9)
    assert rig.run.generation == OVERRIDE  # the generation's settings are untouched


def test_a1111_hires_off_runs_nothing_in_the_hires_pass():
    rig = Rig(SegParams(True, hires="off"))
    rig.step()
    rig.p.is_hr_pass = True
    rig.denoiser = type(rig.denoiser)(rig.inner, rig.p, rig.denoiser.callback)
    rig.inner.calls.clear()
    assert torch.equal(rig.step(), rig.plain())
    assert rig.inner.calls == [4]  # the host's own call only
    assert "combine_denoised" not in vars(rig.denoiser)


def test_a1111_no_leak_into_the_next_generation():
    adapter = A1111Adapter()
    p = make_p()
    p.is_hr_pass = True
    adapter.start(p, OVERRIDE)
    run = getattr(p, RUN_ATTRIBUTE)
    assert run.enter_pass(True)
    assert run.params.layers == "u0"
    adapter.finish(p)
    img2img = make_p()  # next generation (img2img: no hires pass), a new p
    adapter.start(img2img, OVERRIDE)
    assert getattr(img2img, RUN_ATTRIBUTE).params.layers == "m0"
    assert getattr(p, RUN_ATTRIBUTE) is None


@pytest.mark.parametrize("mode", ["full", "partial", "snf"])
@pytest.mark.parametrize("cfg", [7.0, 1.0])
def test_a1111_rescale_through_the_adapter(mode, cfg):
    params = SegParams(True, 3.0, math.inf, "m0", rescale=1.0, rescale_mode=mode)
    rig = Rig(params)
    result = rig.step(cond_scale=cfg)
    rows = torch.stack(rig.cond)
    x0 = rig.predict(rig.x, rig.sigma, rows)
    term = 3.0 * (x0 - rig.predict(rig.x, rig.sigma, rows, names=["m0"], sigma=math.inf))
    plain = rig.plain(cond_scale=cfg)
    if mode == "snf":
        uncond = rig.predict(rig.x, rig.sigma, rig.uncond)
        expected = uncond + _direct_snf(plain - uncond, term)
    else:
        expected = _direct_std_rescale(plain, x0, term, 1.0, mode)
    torch.testing.assert_close(result, expected, rtol=1e-9, atol=1e-9)
    zero = Rig(SegParams(True, 3.0, math.inf, "m0", rescale=0.0, rescale_mode=mode))
    assert torch.equal(zero.step(cond_scale=cfg), Rig(SegParams(True)).step(cond_scale=cfg))


def test_a1111_rescale_with_and_prompts_and_a_batch():
    rig = Rig(SegParams(True, 3.0, math.inf, "m0", rescale=0.5, rescale_mode="partial"), batch=2)
    weights = [[0.7, 0.3], [1.0]]
    conds = rig.conds(weights)
    result = rig.step(conds=conds)
    rows = torch.stack([c for pairs in conds for c, _ in pairs])
    x = torch.stack([rig.x[0], rig.x[0], rig.x[1]])
    sigma = torch.stack([rig.sigma[0], rig.sigma[0], rig.sigma[1]])
    x0 = rig.predict(x, sigma, rows)
    delta = x0 - rig.predict(x, sigma, rows, names=["m0"], sigma=math.inf)
    term = torch.stack([3.0 * (0.7 * delta[0] + 0.3 * delta[1]), 3.0 * delta[2]])
    mixed = torch.stack([0.7 * x0[0] + 0.3 * x0[1], x0[2]])
    expected = _direct_std_rescale(rig.plain(conds=conds), mixed, term, 0.5, "partial")
    torch.testing.assert_close(result, expected, rtol=1e-9, atol=1e-9)


# -- Forge -----------------------------------------------------------------------------------------------------
def _forge_pass(rig: ForgeRig, hires: bool) -> None:
    """What Forge does before a pass: reset the pass UNet, then process_before_every_sampling (twice for the
    hires pass: once before the reset, once after)."""
    rig.p.is_hr_pass = hires
    if hires:
        ForgeAdapter("forge").before_sampling(rig.p)
    rig.p.sd_model.forge_objects.unet = rig.base
    ForgeAdapter("forge").before_sampling(rig.p)


@pytest.mark.parametrize("fast", [True, False])
def test_forge_override_uses_the_hires_settings_in_the_hires_pass_only(fast):
    rig = ForgeRig(OVERRIDE, fast=fast)
    _forge_pass(rig, hires=False)
    first = rig.step()
    expected = rig.plain() + 3.0 * (rig.predict(rig.cond) - rig.predict(rig.cond, names=["m0"]))
    torch.testing.assert_close(first, expected, rtol=1e-9, atol=1e-9)
    _forge_pass(rig, hires=True)
    hires = rig.step()
    expected = rig.plain() + 6.0 * (rig.predict(rig.cond) - rig.predict(rig.cond, names=["u0"], sigma=2.0))
    torch.testing.assert_close(hires, expected, rtol=1e-9, atol=1e-9)


def test_forge_hires_off_leaves_the_hires_pass_unpatched():
    rig = ForgeRig(SegParams(True, hires="off"))
    _forge_pass(rig, hires=False)
    assert rig.p.sd_model.forge_objects.unet is not rig.base
    _forge_pass(rig, hires=True)
    assert rig.p.sd_model.forge_objects.unet is rig.base
    assert torch.equal(rig.step(), rig.plain())


@pytest.mark.parametrize("mode", ["full", "partial", "snf"])
@pytest.mark.parametrize("cfg", [5.0, 1.0])
def test_forge_rescale_through_the_adapter(mode, cfg):
    rig = ForgeRig(SegParams(True, 3.0, math.inf, "m0", rescale=1.0, rescale_mode=mode), batch=2)
    _forge_pass(rig, hires=False)
    result = rig.step(cond_scale=cfg)
    x0 = rig.predict(rig.cond)
    term = 3.0 * (x0 - rig.predict(rig.cond, names=["m0"]))
    if mode == "snf":  # the uncond is computed even at CFG 1, as snf needs it
        uncond = rig.predict(rig.uncond)
        expected = uncond + _direct_snf(uncond + cfg * (x0 - uncond) - uncond, term)
    else:
        plain = rig.plain(cond_scale=cfg)
        expected = _direct_std_rescale(plain, x0, term, 1.0, mode)
    torch.testing.assert_close(result, expected, rtol=1e-9, atol=1e-9)
    options = rig.p.sd_model.forge_objects.unet.model_options
    assert options.get("disable_cfg1_optimization", False) is (mode == "snf")


def test_forge_rescale_zero_is_bit_identical():
    results = []
    for params in (SegParams(True), SegParams(True, rescale=0.0, rescale_mode="snf")):
        rig = ForgeRig(params, batch=2)
        _forge_pass(rig, hires=False)
        results.append(rig.step())
        assert "disable_cfg1_optimization" not in rig.p.sd_model.forge_objects.unet.model_options
    assert torch.equal(*results)


def test_infotext_of_a_run_that_gives_up_loses_every_seg_key():
    rig = Rig(OVERRIDE)
    rig.p.extra_generation_params.update(to_infotext(OVERRIDE, hires_fix=True))
    rig.run.give_up("test")
    assert not any(key.startswith("SEG") for key in rig.p.extra_generation_params)
