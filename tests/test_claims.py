"""SEG never claims what it did not do: a generation (begin_batch / steps / end_batch through the adapters, as
the host calls them) in which no row was smoothed carries no SEG keys and says why in one line; the same rig
with SEG working carries them. And Forge-family host versions SEG does not recognise."""

from __future__ import annotations

import math
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from seg_lib.core.params import BY_INFOTEXT, SegParams, to_infotext
from seg_lib.host.adapter import A1111Adapter, ForgeAdapter
from seg_lib.host.forge_fork import read_forward
from seg_lib.host.forge_host import Conventions
from seg_lib.host.run import on_cfg_denoiser
from tests.standins import BasicTransformerBlock, TinyUNet
from tests.standins_forge import sampling_function
from tests.test_a1111_adapter import Rig, ToMeBlock, _transformer
from tests.test_forge_adapter import ForgeRig
from tests.test_forge_fork import STOCK, ForkRig
from tests.test_reforge import ReForgeRig, token_merging

pytestmark = pytest.mark.usefixtures("float64")

UNGUIDED = "no step was guided ("
SKIPPED = "the selected layers were skipped: skipping "
NESTED = "the sampling calls SEG saw were other extensions' nested calls"
SEPARATE = "[SEG] separate extra UNet call"


def claims(p) -> set[str]:
    return set(BY_INFOTEXT) & set(p.extra_generation_params)


def generate(adapter, rig, steps: int = 2, step=None) -> list[torch.Tensor]:
    """One batch as the host runs it: process_batch, the pass (Forge resets its UNet patcher first, then
    process_before_every_sampling), every step, postprocess_batch."""
    adapter.begin_batch(rig.p)
    if isinstance(adapter, ForgeAdapter):
        rig.p.sd_model.forge_objects.unet = rig.base
        adapter.before_sampling(rig.p)
    results = [(step or rig.step)(step=s, steps=steps) for s in range(steps)]
    adapter.end_batch(rig.p)
    return results


def assert_claims(p, out: str, params: SegParams, cause: str | None = None) -> None:
    """The batch claims SEG (``cause`` None), or claims nothing and says why in exactly one line."""
    lines = [line for line in out.splitlines() if UNGUIDED in line]
    if cause is None:
        assert (p.extra_generation_params, lines) == (to_infotext(params), [])
        return
    assert not claims(p)
    assert len(lines) == 1, lines
    assert f"{UNGUIDED}{cause}" in lines[0]
    assert lines[0].endswith("; the images do not claim SEG")


def assert_plain(results: list[torch.Tensor], plain: torch.Tensor, guided: bool) -> None:
    """Every step is the plain CFG result, or (``guided``) SEG moved the first one."""
    if guided:
        assert (results[0] - plain).abs().max() > 1e-3
    for result in [] if guided else results:
        torch.testing.assert_close(result, plain, rtol=1e-12, atol=1e-12)


def merge(unet: nn.Module, on: bool = True) -> None:
    """tomesd's class swap (A1111) on the depth-0 layers d0 and u2: attn1 sees every other token."""
    for part, index in (("input", 1), ("output", 4)):
        for block in _transformer(unet, part, index).transformer_blocks:
            block.__class__ = ToMeBlock if on else BasicTransformerBlock


# -- 1. every selected layer skipped ----------------------------------------------------------------------------
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("merged", [True, False])
def test_a1111_every_layer_skipped_claims_nothing(fast, merged, capsys):
    params = SegParams(enabled=True, layers="d0,u2")
    unet = TinyUNet().eval()
    merge(unet, merged)
    rig = Rig(params, unet=unet, fast=fast)
    assert_plain(generate(A1111Adapter(), rig), rig.plain(), guided=not merged)
    out = capsys.readouterr().out
    assert_claims(rig.p, out, params, SKIPPED if merged else None)
    assert ("its 39 tokens per row are not the 11x7 grid it works on" in out) is merged


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("merged", [True, False])
def test_forge_every_layer_skipped_claims_nothing(fast, merged, capsys):
    params = SegParams(enabled=True, layers="d0,u2")
    rig = ForgeRig(params, fast=fast)
    merge(rig.unet, merged)  # SEG's attn1 patch gets half the tokens of the 11x7 grid its inner modifier saw
    assert_plain(generate(ForgeAdapter("forge"), rig), rig.plain(), guided=not merged)
    assert rig.model.calls == ([3, 3] if fast else [2, 1, 2, 1])  # a skipped step makes no second extra call
    out = capsys.readouterr().out
    assert_claims(rig.p, out, params, SKIPPED if merged else None)
    assert ("its 39 tokens per row are not the 11x7 grid it works on; SEG goes on" in out) is merged  # no hint


# -- 2. every step's call taken for another extension's nested call -------------------------------------------
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("copied", [True, False])
def test_forge_calls_that_are_never_the_steps_claim_nothing(fast, copied, capsys):
    """A conditioning modifier that hands the step's call a copy of its latents: SEG cannot tell that call
    from a nested one (Reference's), so it guides none, and says so."""
    params = SegParams(enabled=True)
    rig = ForgeRig(params, fast=fast)

    def copy_latents(model, x, timestep, uncond, cond, cond_scale, model_options, seed):
        return model, x.clone() if copied else x, timestep, uncond, cond, cond_scale, model_options, seed

    rig.base.model_options["conditioning_modifiers"] = [copy_latents]

    def step(step: int, steps: int) -> torch.Tensor:
        denoiser = SimpleNamespace(p=rig.p)
        on_cfg_denoiser(SimpleNamespace(denoiser=denoiser, sampling_step=step, total_sampling_steps=steps, x=rig.x))
        unet = rig.p.sd_model.forge_objects.unet
        with torch.no_grad():
            return sampling_function(unet.model, rig.x, rig.sigma, rig.uncond, rig.cond, 5.0, unet.model_options)

    assert_plain(generate(ForgeAdapter("forge"), rig, step=step), rig.plain(), guided=not copied)
    assert rig.model.calls == ([2, 2] if copied else [2, 1, 2, 1])  # no extra pass in what SEG took for nested
    assert_claims(rig.p, capsys.readouterr().out, params, NESTED if copied else None)


# -- 3. the same call cannot be vouched for and the separate call smooths nothing --------------------------------
@pytest.mark.parametrize("merged", [True, False])
def test_forge_misplaced_rows_and_unsmoothable_layers_claim_nothing(merged, capsys):
    """A forward wrapper that runs the UNet a row at a time (no model_function_wrapper, so nothing stops
    SEG arming the same call): the marked rows are not where SEG put them, so the step takes the separate
    call, where the merged layers cannot be smoothed either."""
    params = SegParams(enabled=True, layers="d0,u2")
    rig = ForgeRig(params)
    merge(rig.unet, merged)
    stock = rig.unet.forward

    def each_row(x, timesteps=None, context=None, **kwargs):
        rows = [stock(x[i : i + 1], timesteps[i : i + 1], context[i : i + 1], **kwargs) for i in range(len(x))]
        return torch.cat(rows)

    rig.unet.forward = each_row
    results = generate(ForgeAdapter("forge"), rig)
    assert rig.model.calls == [3, 1] * 2  # the armed call, then the separate cond-only call, at each step
    assert_plain(results, rig.plain(), guided=not merged)
    if not merged:
        expected = rig.plain() + 3.0 * (rig.predict(rig.cond) - rig.predict(rig.cond, ["d0", "u2"]))
        torch.testing.assert_close(results[0], expected, rtol=1e-9, atol=1e-9)
    out = capsys.readouterr().out
    assert out.count(f"{SEPARATE} (another UNet wrapper regroups the batch rows)") == 1
    assert_claims(rig.p, out, params, SKIPPED if merged else None)


# -- 4. a hires pass that guided nothing -------------------------------------------------------------------------
@pytest.mark.parametrize("merged", [True, False])
def test_a_hires_pass_that_guided_nothing_claims_only_the_first_pass(merged, capsys):
    params = SegParams(
        True, 3.0, math.inf, "m0", hires="override", hires_scale=6.0, hires_blur_sigma=2.0, hires_layers="u2"
    )
    unet = TinyUNet().eval()
    merge(unet, merged)  # u2 (the hires layers) merged; m0 (the first pass's) is not
    rig = Rig(params, unet=unet)
    rig.p.enable_hr = True
    adapter = A1111Adapter()
    adapter.begin_batch(rig.p)
    rig.p.is_hr_pass = False
    assert (rig.step() - rig.plain()).abs().max() > 1e-3
    rig.p.is_hr_pass = True  # the hires pass: a new sampler and denoiser
    rig.denoiser = type(rig.denoiser)(rig.inner, rig.p, rig.denoiser.callback)
    hires = [rig.step(step=s, steps=2) for s in range(2)]
    adapter.end_batch(rig.p)
    out = capsys.readouterr().out
    assert_plain(hires, rig.plain(), guided=not merged)
    assert UNGUIDED not in out  # the batch was guided: in its first pass
    claimed = to_infotext(params, hires_fix=True)
    if merged:  # the first pass's keys, and "off" for the hires pass
        claimed = {**{k: v for k, v in claimed.items() if not k.startswith("SEG Hires")}, "SEG Hires": "off"}
    assert rig.p.extra_generation_params == claimed
    assert (claimed["SEG Scale"], claimed["SEG Hires"]) == ("3.0", "off" if merged else "override")
    assert out.count("skipping output block 4") == merged


# -- 5. the batches of one generation ---------------------------------------------------------------------------
@pytest.mark.parametrize("guided", [(True, False), (False, True)])
def test_each_batch_claims_only_what_its_own_steps_did(guided, capsys):
    """n_iter 2: a batch whose steps were not guided carries no keys, whatever the other batch did."""
    params = SegParams(enabled=True, layers="d0")
    rig = Rig(params)
    for on in guided:
        merge(rig.unet, not on)
        generate(A1111Adapter(), rig)
        assert_claims(rig.p, capsys.readouterr().out, params, None if on else SKIPPED)


# -- host versions SEG does not recognise (Forge) ---------------------------------------------------------------
def test_no_arming_hook_takes_the_separate_call_with_one_line(capsys):
    params = SegParams(enabled=True)
    rig = ForgeRig(params)
    rig.run.host.conventions = Conventions(pre_cfg=None, calc_hook=False)
    results = generate(ForgeAdapter("forge"), rig)
    options = rig.p.sd_model.forge_objects.unet.model_options
    assert "model_function_wrapper" not in options
    assert "sampler_pre_cfg_function" not in options
    assert rig.model.calls == [2, 1] * 2
    expected = rig.plain() + 3.0 * (rig.predict(rig.cond) - rig.predict(rig.cond, ["m0"]))
    for result in results:
        torch.testing.assert_close(result, expected, rtol=1e-9, atol=1e-9)
    out = capsys.readouterr().out
    reason = "this WebUI calls its pre-CFG functions after the UNet call and has no cond-batch hook"
    assert out.splitlines() == [f"{SEPARATE} ({reason})"]
    assert_claims(rig.p, out, params)


def test_no_grid_gives_up_with_one_line(capsys):
    rig = ForgeRig(SegParams(enabled=True))
    rig.run.host.conventions = Conventions(grid=None)
    results = generate(ForgeAdapter("forge"), rig)
    assert rig.p.sd_model.forge_objects.unet is rig.base  # nothing installed
    for result in results:
        assert torch.equal(result, rig.plain())
    assert not claims(rig.p)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("[SEG] SEG is off for this generation: this WebUI version shows SEG no layer's")


@pytest.mark.parametrize("batch", [None, "known"])
def test_no_batching_test_never_enlarges_the_call(batch, capsys):
    params = SegParams(enabled=True, layers="d0,m0")
    rig, separate = ForgeRig(params), ForgeRig(params, fast=False)
    if batch is None:
        rig.run.host.conventions = Conventions(batch=None)
    results = generate(ForgeAdapter("forge"), rig)
    expected = generate(ForgeAdapter("forge"), separate)
    for result, same in zip(results, expected, strict=True):
        torch.testing.assert_close(result, same, rtol=1e-9, atol=1e-9)
    out = capsys.readouterr().out
    if batch is None:
        assert rig.model.calls == [2, 1] * 2
        assert out.count(f"{SEPARATE} (this WebUI batches its conds by a test SEG does not know)") == 1
    else:
        assert rig.model.calls == [3] * 2  # the host's free memory is infinite: the same call is enlarged
    assert_claims(rig.p, out, params)


class UnknownUNet(nn.Module):
    def forward(self, x, timesteps=None, context=None, **kwargs):  # not a forward SEG knows
        return x


@pytest.mark.parametrize("known", [False, True])
def test_an_unknown_unet_forward_runs_the_same_call_unforked(known, capsys):
    params = SegParams(enabled=True, layers="d1,u1")
    rig, separate = ForkRig(params), ForkRig(params, fast=False)
    why = read_forward(UnknownUNet, sys.modules[__name__])
    assert why == f"its UNet forward ({__name__}.UnknownUNet) is a version SEG does not know"
    if not known:
        rig.run.host.unet_forwards, rig.run.host.not_forked = {}, why
    results = generate(ForgeAdapter("forge"), rig)
    expected = generate(ForgeAdapter("forge"), separate)
    for result, same in zip(results, expected, strict=True):
        torch.testing.assert_close(result, same, rtol=1e-9, atol=1e-9)
    assert rig.model.calls == [3] * 2
    assert rig.seen == ([3] * 2 if not known else [2] * 2)  # unforked: the copies ran through the whole UNet
    assert rig.run.host.unet_forwards == ({} if not known else STOCK)
    out = capsys.readouterr().out
    note = f"not forked: {why}" if not known else "forked from the conditional branch at input block 3"
    assert out.count(f"smoothed branch computed in the same UNet call ({note})") == 1
    assert ("not forked" in out) is not known
    assert_claims(rig.p, out, params)


# -- the merging hint (forge_patches.regrouping_hint) ------------------------------------------------------------
def token_downsampling() -> dict:
    """An attn1_patch that drops every other token of the queries' source and of the keys'/values' alike."""
    patches = token_merging()
    patches["attn1_patch"] = [lambda n, context, value, extra: (n[:, ::2], context[:, ::2], value[:, ::2])]
    return patches


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize(("patches", "hint"), [(token_merging, True), (token_downsampling, False)])
def test_the_skip_line_says_token_merging_when_the_queries_were_merged_alone(fast, patches, hint, capsys):
    """tomesd's attn1_patch merges the queries' tokens, the keys keep theirs (what SEG's patch can see: the
    host leaves ``patches`` out of its extra options)."""
    rig = ReForgeRig(SegParams(enabled=True, layers="d0"), fast=fast, patches=patches())
    generate(ForgeAdapter("forge"), rig)
    out = capsys.readouterr().out
    line = "skipping input block 1 on the steps where its 39 tokens per row are not the 11x7 grid it works on"
    skips = [text for text in out.splitlines() if text.startswith("[SEG] skipping")]
    assert skips == [f"[SEG] {line}{' (token merging?)' if hint else ''}; SEG goes on where it can"]
    assert_claims(rig.p, out, rig.run.params, SKIPPED)
