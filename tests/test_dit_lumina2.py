"""SEG on Lumina 2 and Z-Image, against host-free stand-ins of ersatzForge's ``Lumina2DiT`` and Forge Neo's
``NextDiT`` (float64): the family is told apart from Flux and SD3.5, the kernel is found behind the blocks'
attention module, only the main layers' image queries are smoothed (not the caption's, not Z-Image's pad
tokens), the same-call fork equals a separate pass, and the one-query shortcut equals the full blur."""

from __future__ import annotations

import math

import pytest
import torch

from seg_lib.core.blocks import DitRef, parse_layers, resolve_dit
from seg_lib.core.blur import smooth_queries
from seg_lib.core.params import SegParams
from seg_lib.families import CHROMA, FLUX, LUMINA2, SD35, ZIMAGE, dit_family
from seg_lib.families.dit import kernel_sites
from seg_lib.families.hooks import dit_hooks
from tests import standins_flux, standins_lumina2, standins_sd35, test_forge_dit
from tests.dit_rig import dit_call, fast_and_separate, kernel_calls_plain_and_seg, one_query_and_full_blur

MODELS = {
    "ersatz-lumina2": lambda layers: standins_lumina2.Lumina2DiT(layers),
    "ersatz-zimage": lambda layers: standins_lumina2.Lumina2DiT(layers, z_image=True, pad_tokens_multiple=8),
    "neo-lumina2": lambda layers: standins_lumina2.NextDiT(layers),
    "neo-zimage": lambda layers: standins_lumina2.NextDiT(layers, z_image=True, pad_tokens_multiple=8),
}
NAMES = list(MODELS)


def _model(name, layers=4, **kwargs):
    torch.manual_seed(5)
    if kwargs:
        return standins_lumina2.Lumina2DiT(layers, **kwargs).double().eval()
    return MODELS[name](layers).double().eval()


def _inputs(rows, height=6, width=10, caption=5):
    torch.manual_seed(6)
    x = torch.randn(rows, standins_lumina2.CHANNELS, height, width, dtype=torch.float64)
    t = torch.rand(rows, dtype=torch.float64)
    return (x, t), {"context": torch.randn(rows, caption, standins_lumina2.CAPTION, dtype=torch.float64)}


def test_the_families_are_detected_and_not_confused():
    for name in NAMES:
        model = _model(name)
        assert dit_family(model) is (ZIMAGE if "zimage" in name else LUMINA2)
        assert not FLUX.matches(model)
        assert not CHROMA.matches(model)
        assert not SD35.matches(model)
        assert LUMINA2.layout(model) == (("layer", 4),)
    for other, family in [
        (standins_flux.Flux(), FLUX),
        (standins_flux.Chroma(), CHROMA),
        (standins_sd35.MMDiTX(), SD35),
    ]:
        assert dit_family(other) is family
        assert not LUMINA2.matches(other)
        assert not ZIMAGE.matches(other)


def test_defaults_are_middle_blocks_of_the_real_depths():
    assert resolve_dit(LUMINA2.default_layers, (("layer", 26),), LUMINA2.name) == tuple(
        DitRef("layer", i) for i in (12, 13, 14)
    )
    assert resolve_dit(ZIMAGE.default_layers, (("layer", 30),), ZIMAGE.name) == tuple(
        DitRef("layer", i) for i in (14, 15, 16)
    )


@pytest.mark.parametrize("name", NAMES)
def test_the_kernel_is_found_behind_the_attention_module(name):
    """The blocks call ``self.attention(...)``; its forward calls the module-level ``attention_function``
    after the q norm and RoPE: that is the site (the refiners call it too, but are never selected)."""
    sites = kernel_sites(dit_family(_model(name)), _model(name))
    assert [(site.namespace is vars(standins_lumina2), site.name) for site in sites] == [(True, "attention_function")]


SELECTIONS = ["layer0", "layer1", "layer3", "layer1-2", "layer0,layer3"]


@pytest.mark.parametrize("sigma", [2.0, math.inf])
@pytest.mark.parametrize("layers", SELECTIONS)
@pytest.mark.parametrize("name", NAMES)
def test_fast_equals_separate(name, layers, sigma):
    """The copies forked at the first selected layer equal a separate cond pass; the host's rows of the
    same call are the model's plain output (Neo's ``unpatchify`` runs on them and on the copies apart)."""
    model = _model(name)
    args, kwargs = _inputs(rows=2)
    fast, separate, plain = fast_and_separate(model, layers, sigma, args, kwargs)
    assert fast.shape[0] == 3
    torch.testing.assert_close(fast[:2], plain, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast[2:], separate, rtol=0, atol=1e-9)
    assert (separate - plain[:1]).abs().max() > 1e-6


@pytest.mark.parametrize(
    ("name", "size"),
    [
        ("ersatz-zimage", (10, 14)),  # odd grid (5 x 7), even latent: ersatzForge cuts the output of odd sides
        ("ersatz-lumina2", (6, 14)),
        ("neo-zimage", (7, 9)),  # odd latent sides, padded to 8 x 10
        ("neo-lumina2", (9, 4)),
    ],
)
def test_fast_equals_separate_on_odd_and_non_square_grids(name, size):
    model = _model(name)
    args, kwargs = _inputs(rows=3, height=size[0], width=size[1], caption=7)  # cond, uncond, another cond
    fast, separate, plain = fast_and_separate(model, "layer1-2", 3.0, args, kwargs, rows=3, cond=slice(1, 3))
    torch.testing.assert_close(fast[:3], plain, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast[3:], separate, rtol=0, atol=1e-9)


def _spy(monkeypatch):
    seen: list = []
    original = standins_lumina2.attention_function

    def spy(q, k, v, heads, *args, **kwargs):
        out = original(q, k, v, heads, *args, **kwargs)
        seen.append((q, k, v, out))
        return out

    monkeypatch.setitem(vars(standins_lumina2), "attention_function", spy)
    return seen


@pytest.mark.parametrize(
    ("name", "size", "caption", "grid", "text"),
    [
        ("ersatz-zimage", (6, 14), 5, (3, 7), 8),  # caption 5 -> 8 tokens; 21 image tokens + 3 pad tokens
        ("neo-zimage", (7, 9), 9, (4, 5), 16),  # caption 9 -> 16; 20 image tokens + 4 pad tokens
        ("ersatz-lumina2", (10, 6), 5, (5, 3), 5),
        ("neo-lumina2", (5, 12), 3, (3, 6), 3),
    ],
)
def test_only_the_image_queries_of_the_selected_layer_are_blurred(name, size, caption, grid, text, monkeypatch):
    """In the selected main layer the kernel gets the caption queries and Z-Image's pad tokens' queries as
    they were and the image queries blurred on the call's grid (padded latent, row-major, after the caption
    padded to the multiple); the keys and values are the host's; the refiners and other layers are untouched.
    The caption tokens' attention output is unchanged, the image tokens' is not."""
    model = _model(name)
    call = dit_call(model, "layer2", 1.5)  # the sites are read from the host's code, before the spy goes in
    seen = _spy(monkeypatch)
    args, kwargs = _inputs(rows=1, height=size[0], width=size[1], caption=caption)
    plain, with_seg = kernel_calls_plain_and_seg(model, call, seen, args, kwargs)
    assert len(with_seg) == len(plain) == 2 + 2 + 4  # context refiner, noise refiner, layers
    changed = [i for i, (a, b) in enumerate(zip(plain, with_seg, strict=True)) if not torch.equal(a[0], b[0])]
    assert changed == [6, 7]  # from layer 2 on (after the four refiner calls): layer 3 gets a changed input
    (q0, k0, v0, out0), (q1, k1, v1, out1) = plain[6], with_seg[6]
    assert torch.equal(k0, k1)
    assert torch.equal(v0, v1)
    n = grid[0] * grid[1]
    pad = q0.shape[2] - text - n
    assert pad == (((-n) % 8) if "zimage" in name else 0)
    torch.testing.assert_close(q1[:, :, :text], q0[:, :, :text], rtol=0, atol=0)
    torch.testing.assert_close(q1[:, :, text + n :], q0[:, :, text + n :], rtol=0, atol=0)
    expected = smooth_queries(q0[:, :, text : text + n].transpose(1, 2).flatten(2), grid[0], grid[1], 1.5)
    torch.testing.assert_close(q1[:, :, text : text + n].transpose(1, 2).flatten(2), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(out1[:, :text], out0[:, :text], rtol=0, atol=1e-12)
    torch.testing.assert_close(out1[:, text + n :], out0[:, text + n :], rtol=0, atol=1e-12)
    assert (out1[:, text : text + n] - out0[:, text : text + n]).abs().max() > 1e-6


@pytest.mark.parametrize("layers", ["layer0", "layer2", "layer3"])
@pytest.mark.parametrize("name", NAMES)
def test_one_query_shortcut_equals_full_blur(name, layers):
    model = _model(name)
    args, kwargs = _inputs(rows=2, height=8, width=6)
    short, full = one_query_and_full_blur(model, layers, args, kwargs)
    torch.testing.assert_close(short, full, rtol=0, atol=1e-10)


def test_negpip_is_one_value_for_all_rows():
    """ersatzForge hands every layer ``negpip[0]``, the first row's caption-token weights: here 2 of them,
    as many as the host's rows, and still not copied for the fork (``shared_args``)."""
    model = _model("ersatz-zimage")
    args, kwargs = _inputs(rows=2)
    kwargs["negpip"] = torch.tensor([[-0.5, 0.8], [-0.5, 0.8]], dtype=torch.float64)
    fast, separate, plain = fast_and_separate(model, "layer1", 2.0, args, kwargs)
    torch.testing.assert_close(fast[:2], plain, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast[2:], separate, rtol=0, atol=1e-9)
    with torch.no_grad():
        assert (model(*args, **{**kwargs, "negpip": None}) - plain).abs().max() > 1e-6


def test_z_image_control_hints_are_copied_with_the_rows(monkeypatch):
    """ersatzForge's Z-Image control: hints made per row from the module-global control latent, a tuple of
    [B, L, D] tensors handed to the layers with a ``block_id``; the fork copies them with the cond rows."""
    model = _model("ersatz-zimage", z_image=True, pad_tokens_multiple=8, control=True)
    torch.manual_seed(7)
    latent = torch.randn(1, 15, 4 * standins_lumina2.CHANNELS, dtype=torch.float64)  # a 3 x 5 grid, patchified
    monkeypatch.setattr(standins_lumina2.shared, "ZITlatent", latent)
    monkeypatch.setattr(standins_lumina2.shared, "ZITstrength", 0.7)
    args, kwargs = _inputs(rows=2)
    for layers in ["layer1", "layer2-3", "layer0"]:
        fast, separate, plain = fast_and_separate(model, layers, 2.0, args, kwargs)
        torch.testing.assert_close(fast[:2], plain, rtol=0, atol=1e-12)
        torch.testing.assert_close(fast[2:], separate, rtol=0, atol=1e-9)
    monkeypatch.setattr(standins_lumina2.shared, "ZITstrength", 0.0)
    with torch.no_grad():
        assert (model(*args, **kwargs) - plain).abs().max() > 1e-6  # the hints did change the output


def test_neo_caption_mask_is_cut_with_the_rows():
    """Neo's context refiner takes the caption mask; it is per row, so the model's entry drops its copies
    with the other inputs and the layers (no mask) fork as usual."""
    model = _model("neo-zimage")
    args, kwargs = _inputs(rows=2, caption=6)
    mask = torch.zeros(2, 6, dtype=torch.float64)
    mask[0, 4:] = -math.inf
    kwargs["attention_mask"] = mask
    fast, separate, plain = fast_and_separate(model, "layer1", math.inf, args, kwargs)
    torch.testing.assert_close(fast[:2], plain, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast[2:], separate, rtol=0, atol=1e-9)


def test_hooks_and_wrappers_are_gone_after_the_call():
    model = _model("neo-lumina2")
    args, kwargs = _inputs(rows=2)
    kernel = standins_lumina2.attention_function
    with torch.no_grad(), dit_hooks(dit_call(model, "layer1", 2.0, rows=1, fork=slice(0, 1))):
        assert "unpatchify" in vars(model)  # the per-row lists' method, run apart on the fork
        model(*args, **kwargs)
    assert "unpatchify" not in vars(model)
    assert standins_lumina2.attention_function is kernel
    modules = [model, *model.layers, model.final_layer]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in modules)


def test_layer_selectors():
    layout = (("layer", 30),)
    assert resolve_dit("layer14-16", layout, "Z-Image") == tuple(DitRef("layer", i) for i in (14, 15, 16))
    assert resolve_dit("Layer 3 - layer5, layer0", layout, "Z-Image")[0] == DitRef("layer", 0)
    assert str(parse_layers("LAYER7 - 9")[0]) == "layer7-9"
    with pytest.raises(ValueError, match=r"'layer30' is not in this Z-Image model; valid: layer0-29"):
        resolve_dit("layer30", layout, "Z-Image")
    with pytest.raises(ValueError, match="mixes block kinds"):
        parse_layers("layer1-joint3")
    with pytest.raises(ValueError, match=r"'double0' is not in this Lumina 2 model; valid: layer0-25"):
        resolve_dit("double0", (("layer", 26),), "Lumina 2")
    with pytest.raises(ValueError, match="is a UNet block"):
        resolve_dit("m0", layout, "Z-Image")
    with pytest.raises(ValueError, match=r"layer<i>"):
        parse_layers("layers3")


@pytest.fixture
def lumina_rig(monkeypatch):
    """``test_forge_dit.DitRig`` (Forge's sampling flow, patcher and KModel stand-ins) on these models."""
    monkeypatch.setattr(test_forge_dit, "_model", lambda name, depth=4: _model(name, depth))
    return test_forge_dit.DitRig


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize(
    ("name", "depth", "layers"), [("ersatz-lumina2", 26, "layer12-14"), ("neo-zimage", 30, "layer14-16")]
)
def test_forge_run_with_the_family_default(lumina_rig, name, depth, layers, fast, capsys):
    """Left at the UNet default (m0), SEG on Lumina 2 / Z-Image smooths the family's middle blocks, the
    infotext says which, and the result is CFG plus the SEG term on the same-call path and the separate one."""
    rig = lumina_rig(name, SegParams(enabled=True, scale=2.0, blur_sigma=4.0), fast=fast, size=(6, 8), depth=depth)
    result = rig.step()
    cfg, cond = rig.plain()
    torch.testing.assert_close(result, cfg + 2.0 * (cond - rig.smoothed_cond(layers, 4.0)), rtol=0, atol=1e-9)
    assert rig.p.extra_generation_params["SEG Layers"] == layers
    assert rig.model.calls == ([3] if fast else [2, 1])
    out = capsys.readouterr().out
    assert ("forked from the conditional branch at layer block" in out) == fast


@pytest.mark.usefixtures("float64")
def test_forge_run_at_cfg_one(lumina_rig):
    """Z-Image Turbo runs at CFG 1: SEG guides the cond alone, its copies ride in the cond call."""
    rig = lumina_rig("ersatz-zimage", SegParams(enabled=True, scale=3.0, blur_sigma=math.inf, layers="layer2"))
    result = rig.step(cond_scale=1.0)
    _, cond = rig.plain()
    torch.testing.assert_close(result, cond + 3.0 * (cond - rig.smoothed_cond("layer2", math.inf)), rtol=0, atol=1e-9)
    assert rig.model.calls == [2]
