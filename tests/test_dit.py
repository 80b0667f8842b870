"""SEG on DiT models, against host-free stand-ins of Forge main's Flux, Chroma and SD3.5 (float64): the hooks
smooth exactly the image queries of the selected blocks, after the q norm and RoPE, on the call's grid; the
same-call fork equals a separate pass; the one-query shortcut equals the full blur at sigma inf."""

from __future__ import annotations

import math

import pytest
import torch

from seg_lib.core.blocks import DitRef, parse_layers, resolve_dit
from seg_lib.core.blur import smooth_queries
from seg_lib.families import CHROMA, FLUX, SD35, dit_family
from seg_lib.families.dit import kernel_sites
from seg_lib.families.hooks import dit_hooks
from tests import standins_flux, standins_sd35
from tests.dit_rig import dit_call, fast_and_separate, kernel_calls_plain_and_seg, one_query_and_full_blur

torch.manual_seed(0)


def _model(name):
    torch.manual_seed(1)
    model = {
        "flux": lambda: standins_flux.Flux(),
        "schnell": lambda: standins_flux.Flux(guidance_embed=False),
        "chroma": lambda: standins_flux.Chroma(),
        "sd35": lambda: standins_sd35.MMDiTX(),
    }[name]()
    return model.double().eval()


def _inputs(name, rows, height=6, width=10):
    torch.manual_seed(2)
    x = torch.randn(rows, 4, height, width, dtype=torch.float64)
    t = torch.rand(rows, dtype=torch.float64)
    if name == "sd35":
        return (x, t), {
            "y": torch.randn(rows, 12, dtype=torch.float64),
            "context": torch.randn(rows, 5, 12, dtype=torch.float64),
        }
    kwargs = {"context": torch.randn(rows, 5, 12, dtype=torch.float64), "y": torch.randn(rows, 6, dtype=torch.float64)}
    if name == "flux":
        kwargs["guidance"] = torch.rand(rows, dtype=torch.float64) * 4
    return (x, t), kwargs


SELECTIONS = {
    "flux": ["double0", "double1", "double2", "single0", "single2", "double1,single1", "double0-2,single0-2"],
    "chroma": ["double0", "double2", "single1", "double1,single2"],
    "schnell": ["double1", "single0"],
    "sd35": ["joint0", "joint1", "joint2", "joint3", "joint1-2"],
}
CASES = [(name, layers) for name, selections in SELECTIONS.items() for layers in selections]


def test_families_are_detected_and_laid_out():
    assert dit_family(_model("flux")) is FLUX
    assert dit_family(_model("schnell")) is FLUX
    assert dit_family(_model("chroma")) is CHROMA
    assert dit_family(_model("sd35")) is SD35
    assert dit_family(torch.nn.Linear(2, 2)) is None
    assert FLUX.layout(_model("flux")) == (("double", 3), ("single", 3))
    assert SD35.layout(_model("sd35")) == (("joint", 4),)


def test_kernel_sites_are_read_from_the_blocks_code():
    flux_sites = kernel_sites(FLUX, _model("flux"))
    assert [(site.namespace is vars(standins_flux), site.name) for site in flux_sites] == [(True, "attention_function")]
    sd35_sites = kernel_sites(SD35, _model("sd35"))
    assert [(site.namespace is vars(standins_sd35), site.name) for site in sd35_sites] == [(True, "attention")]


@pytest.mark.parametrize("sigma", [2.0, math.inf])
@pytest.mark.parametrize(("name", "layers"), CASES)
def test_fast_equals_separate(name, layers, sigma):
    """The smoothed rows forked at the first selected block equal a separate cond pass, and the host's rows
    of the same call are what the model gives without SEG."""
    model = _model(name)
    args, kwargs = _inputs(name, rows=2)  # cond, uncond
    fast, separate, plain = fast_and_separate(model, layers, sigma, args, kwargs)
    assert fast.shape[0] == 3
    torch.testing.assert_close(fast[:2], plain, rtol=0, atol=1e-12)
    torch.testing.assert_close(fast[2:], separate, rtol=0, atol=1e-9)
    assert (separate - plain[:1]).abs().max() > 1e-6  # the smoothing changed the prediction


@pytest.mark.parametrize(("name", "layers"), [c for c in CASES if "," not in c[1]])
def test_one_query_shortcut_equals_full_blur(name, layers):
    model = _model(name)
    args, kwargs = _inputs(name, rows=2)
    short, full = one_query_and_full_blur(model, layers, args, kwargs)
    torch.testing.assert_close(short, full, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("name", "size", "grid"),
    [
        ("flux", (7, 9), (4, 5)),
        ("flux", (6, 10), (3, 5)),
        ("chroma", (5, 12), (3, 6)),
        ("sd35", (7, 9), (3, 4)),
        ("sd35", (8, 6), (4, 3)),
    ],
)
def test_the_image_queries_are_blurred_on_the_call_grid(name, size, grid, monkeypatch):
    """In a selected block the kernel gets the text queries as they were and the image queries blurred on
    the grid of the patchified latent (padded for Flux, cut for SD3.5), row-major, for odd and non-square
    sizes; the keys and values are the host's."""
    model = _model(name)
    layers = "joint1" if name == "sd35" else "double1"
    namespace = vars(standins_sd35 if name == "sd35" else standins_flux)
    kernel_name = "attention" if name == "sd35" else "attention_function"
    seen: list = []
    original = namespace[kernel_name]

    def spy(q, k, v, heads, *args, **kwargs):
        seen.append((q, k, v, kwargs.get("skip_reshape", False)))
        return original(q, k, v, heads, *args, **kwargs)

    call = dit_call(model, layers, 1.5)  # the sites are read from the host's code, before the spy goes in
    monkeypatch.setitem(namespace, kernel_name, spy)
    args, kwargs = _inputs(name, rows=1, height=size[0], width=size[1])
    plain_calls, with_seg = kernel_calls_plain_and_seg(model, call, seen, args, kwargs)
    assert len(with_seg) == len(plain_calls)
    changed = [i for i, (a, b) in enumerate(zip(plain_calls, with_seg, strict=True)) if not torch.equal(a[0], b[0])]
    assert len(changed) >= 1
    index = changed[0]
    (q0, k0, v0, bhld), (q1, k1, v1, _) = plain_calls[index], with_seg[index]
    assert torch.equal(k0, k1)
    assert torch.equal(v0, v1)
    axis = 2 if bhld else 1
    n = grid[0] * grid[1]
    text = q0.shape[axis] - n if name == "sd35" else kwargs["context"].shape[1]
    start = text if name != "sd35" else q0.shape[axis] - n
    torch.testing.assert_close(q1.narrow(axis, 0, start), q0.narrow(axis, 0, start), rtol=0, atol=0)
    image0 = q0.narrow(axis, start, n)
    flat = image0.transpose(1, 2).flatten(2) if bhld else image0
    expected = smooth_queries(flat, grid[0], grid[1], 1.5)
    got = q1.narrow(axis, start, n)
    got = got.transpose(1, 2).flatten(2) if bhld else got
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["flux", "sd35"])
def test_text_tokens_attention_output_is_unchanged_in_a_smoothed_block(name, monkeypatch):
    model = _model(name)
    layers = "joint1" if name == "sd35" else "double1"
    namespace = vars(standins_sd35 if name == "sd35" else standins_flux)
    kernel_name = "attention" if name == "sd35" else "attention_function"
    outputs: list = []
    original = namespace[kernel_name]

    def spy(q, k, v, heads, *args, **kwargs):
        out = original(q, k, v, heads, *args, **kwargs)
        outputs.append(out)
        return out

    args, kwargs = _inputs(name, rows=1)
    call = dit_call(model, layers, math.inf, one_query=True)
    with torch.no_grad():
        # The block's inputs are those of the plain run: only block 1 is smoothed, so blocks before it match.
        monkeypatch.setitem(namespace, kernel_name, spy)
        model(*args, **kwargs)
        plain = list(outputs)
        outputs.clear()
        with dit_hooks(call):
            model(*args, **kwargs)
    block_call = 1 if name == "flux" else 2  # flux: one kernel call per block; sd35: joint + attn2 in block 0
    text = kwargs["context"].shape[1]
    torch.testing.assert_close(outputs[block_call][:, :text], plain[block_call][:, :text], rtol=0, atol=1e-12)
    assert (outputs[block_call][:, text:] - plain[block_call][:, text:]).abs().max() > 1e-6


def test_hooks_are_gone_after_an_error():
    """An interrupted call (the WebUI's interrupt raises inside the model) leaves no hook and no wrapper."""
    model = _model("flux")
    args, kwargs = _inputs("flux", rows=2)  # the host's row and its copy
    kernel = standins_flux.attention_function

    def interrupted(*args, **kwargs):
        raise RuntimeError("interrupted")

    model.single_blocks[1].forward = interrupted
    with (
        pytest.raises(RuntimeError, match="interrupted"),
        dit_hooks(dit_call(model, "double1", 2.0, rows=1, fork=slice(0, 1))),
    ):
        model(*args, **kwargs)
    assert standins_flux.attention_function is kernel
    assert not model._forward_hooks
    assert not model._forward_pre_hooks
    blocks = [*model.double_blocks, *model.single_blocks, model.final_layer]
    assert all(not block._forward_pre_hooks and not block._forward_hooks for block in blocks)


def test_a_fork_that_never_happens_is_an_error():
    """A call in which the first selected block does not run (another extension skips it) cannot give the
    copies' output: the call raises, and the host's wrapper takes the separate call."""
    model = _model("sd35")
    args, kwargs = _inputs("sd35", rows=2)
    kwargs["transformer_options"] = {"skip_layers": [2]}  # as Forge's SD3.5 skips layers
    with (
        pytest.raises(RuntimeError, match="did not run"),
        dit_hooks(dit_call(model, "joint2", 2.0, rows=1, fork=slice(0, 1))),
    ):
        model(*args, **kwargs)


def test_dit_selectors():
    layout = (("double", 19), ("single", 38))
    assert resolve_dit("double7-9, single7-9", layout, "Flux")[0] == DitRef("double", 7)
    assert len(resolve_dit("double0-double18,single0-37", layout, "Flux")) == 57
    with pytest.raises(ValueError, match=r"single38.*valid: double0-18, single0-37"):
        resolve_dit("single38", layout, "Flux")
    with pytest.raises(ValueError, match="is a UNet block"):
        resolve_dit("m0", layout, "Flux")
    with pytest.raises(ValueError, match=r"not in this SD3\.5"):
        resolve_dit("double0", (("joint", 24),), "SD3.5")
    assert str(parse_layers("Joint7 - 9")[0]) == "joint7-9"
