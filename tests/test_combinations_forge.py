"""SEG next to other Forge extensions, on host-free stand-ins of their mechanisms: a patch that keeps state
from one UNet call to the next (Reference), block patches that resize the hidden state (Kohya HRFix /
Deep Shrink), and a UNet function wrapper that runs the latent in tiles (MultiDiffusion)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seg_lib.core.params import SegParams
from seg_lib.host.run import on_cfg_denoiser
from tests.standins_forge import ForgeModel, ReferenceLike, UnetPatcher, calc_cond_uncond_batch, sampling_function
from tests.test_a1111_adapter import reference_smoothing
from tests.test_forge_adapter import ForgeRig

pytestmark = pytest.mark.usefixtures("float64")
ALL_LAYERS = [(part, index, t) for part, index in (("input", 1), ("input", 3), ("middle", 0)) for t in range(2)] + [
    ("output", index, t) for index in (0, 2, 4) for t in range(2)
]


def run_step(rig: ForgeRig, cond_scale: float = 5.0) -> torch.Tensor:
    """One step through the stand-in of Forge's sampling_function (conditioning modifiers first)."""
    from types import SimpleNamespace

    on_cfg_denoiser(
        SimpleNamespace(denoiser=SimpleNamespace(p=rig.p), sampling_step=0, total_sampling_steps=1, x=rig.x)
    )
    unet = rig.p.sd_model.forge_objects.unet
    with torch.no_grad():
        return sampling_function(unet.model, rig.x, rig.sigma, rig.uncond, rig.cond, cond_scale, unet.model_options)


# -- Reference: per-call state -------------------------------------------------------------------------------
@pytest.mark.parametrize("fast", [True, False])
def test_reference_state_is_never_touched_and_the_image_is_made(fast, capsys):
    """The same-call path is not even tried (a failed try used to leave Reference's recorded keys with the
    wrong batch and lose the image); the nested recording call is neither guided nor joined by SEG's pass;
    SEG's separate call reads the reference state exactly as the host's cond rows did."""
    rig = ForgeRig(SegParams(enabled=True, layers="m0"), fast=fast, batch=2)
    reference_latent = torch.randn(rig.x.shape, generator=torch.Generator().manual_seed(9))
    reference = ReferenceLike(rig.base, reference_latent, ALL_LAYERS)
    rig.run.patch(rig.p)
    result = run_step(rig)
    assert rig.model.calls == [2, 4, 2]  # recording (cond only), the host's cond/uncond, SEG's cond

    bare_patcher = UnetPatcher(ForgeModel(rig.unet))
    bare = ReferenceLike(bare_patcher, reference_latent, ALL_LAYERS)
    with torch.no_grad():
        plain = sampling_function(
            bare_patcher.model, rig.x, rig.sigma, rig.uncond, rig.cond, 5.0, bare_patcher.model_options
        )
    assert reference.recorded.keys() == bare.recorded.keys()
    for key, (k, v) in reference.recorded.items():
        torch.testing.assert_close(k, bare.recorded[key][0], rtol=0, atol=0)
        torch.testing.assert_close(v, bare.recorded[key][1], rtol=0, atol=0)
    options = bare_patcher.model_options
    with torch.no_grad():
        cond = calc_cond_uncond_batch(bare_patcher.model, rig.cond, None, rig.x, rig.sigma, options)[0]
        with reference_smoothing(rig.unet, ["m0"], math.inf):
            cond_seg = calc_cond_uncond_batch(bare_patcher.model, rig.cond, None, rig.x, rig.sigma, options)[0]
    torch.testing.assert_close(result, plain + 3.0 * (cond - cond_seg), rtol=1e-9, atol=1e-9)
    out = capsys.readouterr().out
    if fast:
        assert "separate extra UNet call (another extension replaces attn1 (standins_forge.attn1_proc" in out
    assert "failed" not in out


# -- Kohya HRFix / Deep Shrink: block patches resize the hidden state ----------------------------------------
def deep_shrink(factor: float, block: int = 2) -> dict:
    """Kohya HRFix's patches: shrink after input block ``block`` (rounded, as it does), and bring the decoder's
    hidden state back to the skip's size before they are concatenated."""

    def input_block_patch(h, options):
        if options["block"][1] == block:
            h = F.interpolate(h, size=(round(h.shape[-2] / factor), round(h.shape[-1] / factor)), mode="bicubic")
        return h

    def output_block_patch(h, hsp, options):
        if h.shape[-2:] != hsp.shape[-2:]:
            h = F.interpolate(h, size=hsp.shape[-2:], mode="bicubic")
        return h, hsp

    return {"input_block_patch": [input_block_patch], "output_block_patch": [output_block_patch]}


@pytest.mark.parametrize("factor", [1.5, 2.0, 3.0])
@pytest.mark.parametrize("fast", [True, False])
def test_deep_shrink_is_smoothed_on_the_shrunk_grid(factor, fast, capsys):
    rig = ForgeRig(SegParams(enabled=True, layers="d1,m0,u1"), fast=fast, height=24, width=16)
    patches = deep_shrink(factor)
    rig.base.model_options["transformer_options"]["patches"] = patches
    rig.run.patch(rig.p)
    result = rig.step()
    assert rig.model.calls == ([3] if fast else [2, 1])  # block patches are row-wise: the same call is fine
    options = {"transformer_options": {"patches": patches}}
    with torch.no_grad():
        plain = calc_cond_uncond_batch(ForgeModel(rig.unet), rig.cond, rig.uncond, rig.x, rig.sigma, options)
    cond, uncond = plain
    seg = rig.predict(rig.cond, ["d1", "m0", "u1"], options=options)
    torch.testing.assert_close(result, uncond + 5.0 * (cond - uncond) + 3.0 * (cond - seg), rtol=1e-9, atol=1e-9)
    assert "skipping" not in capsys.readouterr().out


def test_deep_shrink_changes_the_grid():
    """The check above can fail: the shrunk middle grid is not the latent's (which the old code assumed)."""
    rig = ForgeRig(None, height=24, width=16)
    seen = []

    def inner(x, flag, layer, index, sequence, options):
        if flag == "before" and options["block"] == ("middle", 0):
            seen.append(tuple(x.shape[-2:]))
        return x

    options = {"transformer_options": {"patches": deep_shrink(2.0), "block_inner_modifiers": [inner]}}
    with torch.no_grad():
        calc_cond_uncond_batch(ForgeModel(rig.unet), rig.cond, None, rig.x, rig.sigma, options)
    assert seen == [(3, 2)]  # unshrunk: 6x4


# -- MultiDiffusion: the UNet function wrapper runs the latent in tiles ---------------------------------------
def tiles(apply_model, args):
    """Two tiles side by side, each a UNet call with every row; c's tensors that carry the latent's grid
    (c_concat) are cut the same way."""
    x, c = args["input"], args["c"]
    half = x.shape[-1] // 2
    out = []
    for part in (slice(0, half), slice(half, None)):
        tile_c = {k: (v[..., part] if k == "c_concat" else v) for k, v in c.items()}
        out.append(apply_model(x[..., part], args["timestep"], **tile_c))
    return torch.cat(out, dim=-1)


@pytest.mark.parametrize("fast", [True, False])
def test_tiles_are_smoothed_on_their_own_grid(fast, capsys):
    rig = ForgeRig(SegParams(enabled=True, layers="d0,m0"), fast=fast, height=8, width=12)
    rig.base.set_model_unet_function_wrapper(tiles)
    rig.run.patch(rig.p)
    result = rig.step()
    assert rig.model.calls == [2, 2, 1, 1]  # the host's call in 2 tiles, then SEG's separate call in 2 tiles
    options = {"model_function_wrapper": tiles}
    with torch.no_grad():
        cond, uncond = calc_cond_uncond_batch(ForgeModel(rig.unet), rig.cond, rig.uncond, rig.x, rig.sigma, options)
        with reference_smoothing(rig.unet, ["d0", "m0"], math.inf):
            seg = calc_cond_uncond_batch(ForgeModel(rig.unet), rig.cond, None, rig.x, rig.sigma, options)[0]
    torch.testing.assert_close(result, uncond + 5.0 * (cond - uncond) + 3.0 * (cond - seg), rtol=1e-9, atol=1e-9)
    out = capsys.readouterr().out
    assert "skipping" not in out
    if fast:
        assert "(another UNet function wrapper (test_combinations_forge.tiles; MultiDiffusion?))" in out


def test_the_console_names_the_other_extension_by_its_script_file():
    from seg_lib.host.forge_others import same_call_blockers

    def attn1_proc(q, k, v, extra):
        return q

    attn1_proc.__module__ = "forge_reference.py"  # how the WebUIs name a script file's module
    options = {"transformer_options": {"patches_replace": {"attn1": {("middle", 0, 0): attn1_proc}}}}
    assert same_call_blockers(options) == [
        "another extension replaces attn1 (forge_reference.attn1_proc; Reference, IP-Adapter?)"
    ]
