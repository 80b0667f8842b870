"""SEG on Forge Neo's Flux, Flux.2 and Chroma (``standins_neo_flux``, float64): the kernel site read from Neo's
blocks is ``attention_function`` behind ``attention`` (after the q norm and RoPE), the fork equals a separate
pass with Neo's calling convention (mask and options by keyword, in-place residuals, block patches,
``transformer_options`` written by the model), Flux.2's grid is its latent's own (patch 1), reference tokens
stay untouched, and a call with ControlNet residuals between the blocks is not forked."""

from __future__ import annotations

import math

import pytest
import torch

from seg_lib.core.blur import smooth_queries
from seg_lib.core.params import SegParams
from seg_lib.families import CHROMA, FLUX, LUMINA2, SD35, ZIMAGE, dit_family
from seg_lib.families.dit import kernel_sites
from seg_lib.families.hooks import dit_hooks
from tests import standins_neo_flux, test_forge_dit
from tests.dit_rig import dit_call, fast_and_separate, grow, kernel_calls_plain_and_seg, one_query_and_full_blur

neo = standins_neo_flux

MODELS = {
    "flux": lambda: neo.IntegratedFluxTransformer2DModel(),
    "schnell": lambda: neo.IntegratedFluxTransformer2DModel(guidance_embed=False),
    "flux2": lambda: neo.IntegratedFluxTransformer2DModel(guidance_embed=False, flux2=True),
    "chroma": lambda: neo.IntegratedChromaTransformer2DModel(),
}


def _model(name):
    torch.manual_seed(8)
    return MODELS[name]().double().eval()


def _inputs(name, rows, height=5, width=7, text=4):
    torch.manual_seed(9)
    channels = 4 * neo.CHANNELS if name == "flux2" else neo.CHANNELS
    x = torch.randn(rows, channels, height, width, dtype=torch.float64)
    kwargs = {"context": torch.randn(rows, text, neo.CONTEXT, dtype=torch.float64), "transformer_options": {}}
    if name != "chroma":
        kwargs["y"] = torch.randn(rows, neo.VEC, dtype=torch.float64)
    if name == "flux":
        kwargs["guidance"] = torch.rand(rows, dtype=torch.float64) * 4
    return (x, torch.rand(rows, dtype=torch.float64)), kwargs


def test_families_and_patch_sizes():
    assert dit_family(_model("flux")) is FLUX
    assert dit_family(_model("schnell")) is FLUX
    assert dit_family(_model("flux2")) is FLUX  # global modulation, same block lists and text-first joins
    assert dit_family(_model("chroma")) is CHROMA
    for name in MODELS:
        assert not any(family.matches(_model(name)) for family in (SD35, LUMINA2, ZIMAGE))
    assert FLUX.patch(_model("flux")) == 2
    assert FLUX.patch(_model("flux2")) == 1
    assert FLUX.grid(5, 7, FLUX.patch(_model("flux2"))) == (5, 7)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_site_is_attention_function_behind_attention(name):
    """Neo's blocks call ``attention(q, k, v, pe=..., mask=..., transformer_options=...)``; it applies RoPE to
    the normed q and k and calls the module-level ``attention_function``: the site SEG wraps."""
    sites = kernel_sites(dit_family(_model(name)), _model(name))
    assert [(site.namespace is vars(neo), site.name) for site in sites] == [(True, "attention_function")]


SELECTIONS = ["double0", "double2", "single0", "single2", "double1,single1"]


@pytest.mark.parametrize("sigma", [2.0, math.inf])
@pytest.mark.parametrize("layers", SELECTIONS)
@pytest.mark.parametrize("name", list(MODELS))
def test_fast_equals_separate(name, layers, sigma):
    model = _model(name)
    args, kwargs = _inputs(name, rows=2)
    fast, separate, plain = fast_and_separate(model, layers, sigma, args, kwargs)
    assert fast.shape[0] == 3
    torch.testing.assert_close(fast[:2], plain, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast[2:], separate, rtol=0, atol=1e-9)
    assert (separate - plain[:1]).abs().max() > 1e-6


@pytest.mark.parametrize("name", ["flux", "flux2", "chroma"])
def test_fast_equals_separate_with_a_per_row_mask_and_a_block_patch(name):
    """An attention mask per row (``attention_mask``: the one-query shortcut steps aside, the copies get the
    cond rows' mask) and a ``patches_replace["dit"]`` block patch that calls the original block."""
    model = _model(name)
    args, kwargs = _inputs(name, rows=2)
    text = kwargs["context"].shape[1]
    tokens = text + (5 * 7 if name == "flux2" else 3 * 4)
    mask = torch.zeros(2, 1, tokens, tokens, dtype=torch.float64)
    mask[1, :, :, 1] = -math.inf  # the uncond row does not see text token 1
    kwargs["attention_mask"] = mask
    calls = []

    def patch(args, extra):
        calls.append(args["img"].shape[0])
        return extra["original_block"](args)

    kwargs["transformer_options"] = {"patches_replace": {"dit": {("double_block", 1): patch}}}
    for layers in ["double1", "double0,single2"]:
        calls.clear()
        fast, separate, plain = fast_and_separate(model, layers, math.inf, args, kwargs)
        torch.testing.assert_close(fast[:2], plain, rtol=0, atol=1e-12)
        torch.testing.assert_close(fast[2:], separate, rtol=0, atol=1e-9)
        if name != "chroma":  # Neo's Chroma has no block patches
            assert calls == [2, 1, 3 if layers == "double0,single2" else 2]


def _spy(monkeypatch):
    seen: list = []
    original = neo.attention_function

    def spy(q, k, v, heads, *args, **kwargs):
        seen.append((q, k, v, kwargs))
        return original(q, k, v, heads, *args, **kwargs)

    monkeypatch.setitem(vars(neo), "attention_function", spy)
    return seen


@pytest.mark.parametrize(("name", "size", "grid"), [("flux2", (5, 7), (5, 7)), ("flux", (5, 7), (3, 4))])
def test_the_image_queries_are_blurred_on_the_models_own_grid(name, size, grid, monkeypatch):
    """Flux.2's latent is patchified already (``patch_size`` 1): its image grid is the latent's, not half of
    it; the text queries before the image ones stay, keys and values are the host's, the options go through."""
    model = _model(name)
    call = dit_call(model, "double1", 1.5)
    seen = _spy(monkeypatch)
    args, kwargs = _inputs(name, rows=1, height=size[0], width=size[1])
    plain, with_seg = kernel_calls_plain_and_seg(model, call, seen, args, kwargs)
    (q0, k0, v0, options0), (q1, k1, v1, options1) = plain[1], with_seg[1]
    assert options1 == options0
    assert options1["mask"] is None
    assert "transformer_options" in options1
    assert torch.equal(k0, k1)
    assert torch.equal(v0, v1)
    text, n = kwargs["context"].shape[1], grid[0] * grid[1]
    assert q0.shape[2] == text + n
    torch.testing.assert_close(q1[:, :, :text], q0[:, :, :text], rtol=0, atol=0)
    expected = smooth_queries(q0[:, :, text:].transpose(1, 2).flatten(2), grid[0], grid[1], 1.5)
    torch.testing.assert_close(q1[:, :, text:].transpose(1, 2).flatten(2), expected, rtol=0, atol=1e-12)


def test_reference_tokens_stay_and_the_fork_takes_a_one_row_kontext_call(monkeypatch):
    """Kontext / Flux.2 editing: the reference latent (batch 1, a module global) goes after the image tokens,
    so Neo runs such a model one row per call (CFG 1). The fork keeps the model's entry at the host's one row
    (an enlarged batch would not join the batch-1 reference) and copies the row at the first selected block;
    the reference tokens' queries are never blurred."""
    model = _model("flux")
    torch.manual_seed(10)
    monkeypatch.setitem(neo.dynamic_args, "ref_latents", [torch.randn(1, neo.CHANNELS, 4, 6, dtype=torch.float64)])
    args, kwargs = _inputs("flux", rows=1)
    fast, separate, plain = fast_and_separate(model, "double1,single0", 3.0, args, kwargs, rows=1, cond=slice(0, 1))
    torch.testing.assert_close(fast[:1], plain, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast[1:], separate, rtol=0, atol=1e-9)
    call = dit_call(model, "double1", 3.0)
    seen = _spy(monkeypatch)
    plain, with_seg = kernel_calls_plain_and_seg(model, call, seen, args, kwargs)
    plain_q, seg_q = plain[1][0], with_seg[1][0]
    text, image = kwargs["context"].shape[1], 3 * 4
    assert plain_q.shape[2] == text + image + 2 * 3  # text, image, reference
    torch.testing.assert_close(seg_q[:, :, text + image :], plain_q[:, :, text + image :], rtol=0, atol=0)
    assert (seg_q[:, :, text : text + image] - plain_q[:, :, text : text + image]).abs().max() > 1e-6


@pytest.mark.parametrize("name", ["flux", "chroma"])
def test_controlnet_residuals_between_blocks_are_not_forked(name):
    """Neo adds ControlNet residuals to the image tokens between its blocks, for the host's rows: the fork
    declines before the model runs (the host's wrapper then takes the separate call), which works."""
    model = _model(name)
    args, kwargs = _inputs(name, rows=2)
    torch.manual_seed(11)
    kwargs["control"] = {"input": [torch.randn(2, 12, neo.WIDTH, dtype=torch.float64)], "output": []}
    big_args, big_kwargs = grow(args, {**kwargs, "control": None}, slice(0, 1))
    big_kwargs["control"] = kwargs["control"]
    with (
        torch.no_grad(),
        pytest.raises(RuntimeError, match="ControlNet residuals"),
        dit_hooks(dit_call(model, "double1", 2.0, rows=2, fork=slice(0, 1))),
    ):
        model(*big_args, **big_kwargs)
    one_row = {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    one_row["control"] = {"input": [kwargs["control"]["input"][0][:1]], "output": []}
    with torch.no_grad(), dit_hooks(dit_call(model, "double1", 2.0)):
        separate = model(*(a[:1] for a in args), **one_row)
    assert separate.shape[0] == 1


@pytest.mark.parametrize(("name", "layers"), [("flux", "double2"), ("flux2", "single1"), ("chroma", "double0")])
def test_one_query_shortcut_equals_full_blur(name, layers):
    model = _model(name)
    args, kwargs = _inputs(name, rows=2)
    short, full = one_query_and_full_blur(model, layers, args, kwargs)
    torch.testing.assert_close(short, full, rtol=0, atol=1e-10)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize(("name", "layers"), [("flux", "double1,single2"), ("chroma", "single0")])
def test_forge_run_on_neo_models(monkeypatch, name, layers, fast):
    """Forge's sampling flow (``test_forge_dit.DitRig``) on Neo's models: CFG plus the SEG term, on the
    same-call path as on the separate call."""
    monkeypatch.setattr(test_forge_dit, "_model", lambda name, depth=4: _model(name))
    rig = test_forge_dit.DitRig(name, SegParams(enabled=True, scale=2.0, blur_sigma=3.0, layers=layers), fast=fast)
    result = rig.step()
    cfg, cond = rig.plain()
    torch.testing.assert_close(result, cfg + 2.0 * (cond - rig.smoothed_cond(layers, 3.0)), rtol=0, atol=1e-9)
    assert rig.model.calls == ([3] if fast else [2, 1])
