"""SEG next to other A1111 extensions, on host-free stand-ins of their mechanisms: a block that resizes the
hidden state (Deep Shrink), tiles of the latent (Tiled Diffusion), Hypertile's regrouping of tokens, and
what sd-webui-controlnet leaves installed (its idle UNet forward, its transformer-block hacks)."""

from __future__ import annotations

import sys
from types import MethodType

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tests.hook as controlnet_hook
import tests.hypertile as hypertile
from seg_lib.core.params import SegParams
from seg_lib.host.a1111_others import fork_blocker
from seg_lib.host.marks import owned
from tests.standins import KDiffusionWrapper
from tests.test_a1111_adapter import BLOCKS, Rig, _transformer, reference_smoothing

pytestmark = pytest.mark.usefixtures("float64")
FORK_LINE = "fast path, forked from the conditional branch"
SEPARATE_LINE = "separate extra UNet pass per step"


def expected(rig: Rig, names: list[str], scale: float = 3.0) -> torch.Tensor:
    """CFG plus the SEG term, both branches computed in full, the grids read from the activations."""
    cond = torch.stack(rig.cond)
    delta = rig.predict(rig.x, rig.sigma, cond) - rig.predict(rig.x, rig.sigma, cond, names=names)
    return rig.plain() + scale * delta


# -- Deep Shrink: the hidden state is resized inside the UNet ------------------------------------------------
class Scaler(nn.Module):
    """What an A1111 Deep Shrink extension (wcde/sd-webui-kohya-hiresfix) puts in place of a UNet block:
    the block, its input resized by ``scale`` first."""

    def __init__(self, block: nn.Module, scale: float) -> None:
        super().__init__()
        self.block, self.scale = block, scale

    def forward(self, x: torch.Tensor, *args: object) -> torch.Tensor:
        return self.block(F.interpolate(x, scale_factor=self.scale, mode="bicubic"), *args)


@pytest.mark.parametrize("factor", [1.5, 2.0, 3.0])
@pytest.mark.parametrize("fast", [True, False])
def test_deep_shrink_smooths_on_the_shrunk_grid(factor, fast, capsys):
    """The latent is 11x7 but, shrunk at input block 3, the middle block works on another grid: SEG takes the
    grid from the activation, on both paths, for any factor."""
    rig = Rig(SegParams(enabled=True, layers="d1,m0,u1"), height=22, width=14, fast=fast)
    rig.unet.input_blocks[3] = Scaler(rig.unet.input_blocks[3], 1 / factor)
    rig.unet.output_blocks[2] = Scaler(rig.unet.output_blocks[2], 1.0)  # the host's th.cat brings sizes back
    shapes = []
    probe = _transformer(rig.unet, "middle", 0).register_forward_pre_hook(
        owned(lambda _m, args: shapes.append(tuple(args[0].shape[-2:])))  # the test's probe, not an extension
    )
    result = rig.step()
    probe.remove()
    assert shapes[0] != (6, 4)  # the unshrunk middle grid of a 22x14 latent: the shrink really happened
    torch.testing.assert_close(result, expected(rig, ["d1", "m0", "u1"]), rtol=1e-9, atol=1e-9)
    out = capsys.readouterr().out
    assert "skipping" not in out
    assert (FORK_LINE in out) == fast  # a replaced block is a module, not a forward: the fork stays possible


# -- Tiled Diffusion: the sampler's model wrapper runs the latent tile by tile --------------------------------
def install_tiles(rig: Rig) -> list[tuple[int, ...]]:
    """Replace the k-diffusion wrapper's forward, as Tiled Diffusion does: two tiles side by side, each a
    whole UNet call on its part of the latent (and of any ``c_concat``); returns the shapes it ran."""
    plain = rig.inner.forward
    seen: list[tuple[int, ...]] = []

    def tiled_forward(x: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        half = x.shape[-1] // 2
        out = []
        for part in (slice(0, half), slice(half, None)):
            seen.append(tuple(x[..., part].shape))
            out.append(plain(x[..., part], sigma, cond=cond))
        return torch.cat(out, dim=-1)

    rig.inner.forward = tiled_forward
    return seen


@pytest.mark.parametrize("fast", [True, False])
def test_tiles_are_smoothed_on_their_own_grid(fast, capsys):
    rig = Rig(SegParams(enabled=True, layers="d0,m0"), height=8, width=12, fast=fast)
    seen = install_tiles(rig)
    result = rig.step()
    assert seen[0] == (4, 4, 8, 6)  # the host's call: cond + uncond of 2 images, tile by tile
    # expected: the same tiled calls, cond rows smoothed on each tile's own 8x6 grid
    reference = Rig(None, height=8, width=12)
    reference.unet.load_state_dict(rig.unet.state_dict())
    install_tiles(reference)
    plain = reference.step()
    cond = {"c_crossattn": [torch.stack(rig.cond)], "c_concat": [torch.zeros(1)]}
    with torch.no_grad():
        cond_pred = reference.inner(rig.x, rig.sigma, cond=cond)
        with reference_smoothing(reference.unet, ["d0", "m0"], float("inf")):
            cond_seg = reference.inner(rig.x, rig.sigma, cond=cond)
    torch.testing.assert_close(result, plain + 3.0 * (cond_pred - cond_seg), rtol=1e-9, atol=1e-9)
    out = capsys.readouterr().out
    assert "skipping" not in out
    if fast:
        assert f"{SEPARATE_LINE} (another extension wraps the sampler's model (Tiled Diffusion?))" in out


# -- Hypertile: attn1 regroups each row's tokens into tiles ---------------------------------------------------
def install_hypertile(rig: Rig, seed: int) -> None:
    hypertile.RNG_INSTANCE.seed(seed)
    hypertile.hook(_transformer(rig.unet, "input", 1).transformer_blocks[0].attn1, 12, 6)  # d0: depth 0


def test_hypertile_fast_and_separate_make_the_same_image(monkeypatch, capsys):
    """The tiled layer is skipped on both paths (its tokens are tiles, not its grid) and the other layers are
    smoothed; Hypertile draws its tiles at random at every call, so SEG's separate pass puts the generator
    back: the host's calls tile the same way on both paths and without SEG."""
    monkeypatch.setitem(sys.modules, "hypertile", hypertile)  # where SEG looks for the real one
    results, states = {}, {}
    for name, params in (("fast", True), ("separate", False), ("off", None)):
        rig = Rig(
            None if params is None else SegParams(enabled=True, layers="d0,m0", scale=3.0),
            height=12,
            width=6,
            fast=bool(params),
        )
        rig.host.opts().hypertile_enable_unet = True
        install_hypertile(rig, seed=5)
        results[name] = [rig.step(), rig.step()]
        states[name] = hypertile.RNG_INSTANCE.getstate()
    for fast, separate in zip(results["fast"], results["separate"], strict=True):
        torch.testing.assert_close(fast, separate, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(results["fast"][1], results["off"][1])  # m0 was smoothed: SEG moved the image
    assert states["fast"] == states["separate"] == states["off"]  # the host's tiles were drawn as without SEG
    out = capsys.readouterr().out
    skips = [line for line in out.splitlines() if "skipping input block 1 on the steps where its" in line]
    assert len(skips) == 2  # once per generation (fast, separate): the tiled layer, with the grid it works on
    assert all("tokens per row are not the 12x6 grid" in line for line in skips)
    assert "(Hypertile U-Net is on)" in out


def test_hypertile_wrapper_is_recognised_as_row_wise():
    rig = Rig(SegParams(enabled=True))
    install_hypertile(rig, seed=0)
    assert fork_blocker(rig.unet) is None


# -- what sd-webui-controlnet leaves on the UNet -------------------------------------------------------------
def test_controlnet_idle_forward_keeps_the_fast_path(capsys):
    """After a generation with a unit, sd-webui-controlnet's restore() sets ``unet.forward`` back to the bound
    stock method, as an instance attribute: idle, so the fork runs through it, and it is left in place."""
    rig = Rig(SegParams(enabled=True))
    idle = rig.unet.forward  # what ControlNet saved as _original_forward and puts back
    rig.unet.forward = idle
    result = rig.step()
    torch.testing.assert_close(result, expected(rig, ["m0"]), rtol=1e-9, atol=1e-9)
    assert rig.inner.calls == [6]  # one host call, 2 images x (cond, uncond, smoothed copy)
    assert FORK_LINE in capsys.readouterr().out
    assert vars(rig.unet)["forward"] is idle  # another extension's attribute, as it was


def test_controlnet_active_forward_means_the_hosts_call_repeated(capsys):
    rig = Rig(SegParams(enabled=True))
    stock = type(rig.unet).forward

    def forward_webui(self, *args, **kwargs):  # ControlNet's hooked forward (control added to every row)
        return stock(self, *args, **kwargs)

    rig.unet.forward = MethodType(forward_webui, rig.unet)
    torch.testing.assert_close(rig.step(), expected(rig, ["m0"]), rtol=1e-9, atol=1e-9)
    assert rig.inner.calls == [4, 4]  # the host's call, then the same batch again with the cond rows smoothed
    assert f"{SEPARATE_LINE} (another extension wraps the UNet's forward (ControlNet?)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("state", "forks"),
    [
        (controlnet_hook.AutoMachine.Read, True),
        (controlnet_hook.AutoMachine.Write, False),
        (controlnet_hook.AutoMachine.StyleAlign, False),
    ],
)
def test_controlnet_transformer_hacks_fork_only_when_idle(state, forks, capsys):
    """ControlNet's reference/StyleAlign hacks stay on the transformer blocks after its run. In the Read
    state they are the stock block; in Write they record the batch (per-call state), in StyleAlign they share
    attention across the batch: then the smoothed rows must not join the host's call."""
    rig = Rig(SegParams(enabled=True))
    for name in BLOCKS:
        for block in _transformer(rig.unet, *BLOCKS[name]).transformer_blocks:
            controlnet_hook.install(block, state)
    rig.step()
    assert rig.inner.calls == ([6] if forks else [4, 2])
    out = capsys.readouterr().out
    assert (FORK_LINE in out) == forks
    if not forks:
        assert "another extension (hook.py) replaces BasicTransformerBlock.forward" in out


def test_an_unknown_module_replacement_means_the_separate_pass(capsys):
    """Regional Prompter and the like replace attention forwards for a generation: unknown, so not forked."""
    rig = Rig(SegParams(enabled=True))
    attn2 = _transformer(rig.unet, "middle", 0).transformer_blocks[0].attn2
    plain = attn2.forward
    attn2.forward = lambda x, context=None, mask=None: plain(x, context=context)
    result = rig.step()
    torch.testing.assert_close(result, expected(rig, ["m0"]), rtol=1e-9, atol=1e-9)
    assert rig.inner.calls == [4, 2]
    assert "replaces CrossAttention.forward at middle_block.1.transformer_blocks.0.attn2" in capsys.readouterr().out


def test_a_foreign_module_hook_means_the_separate_pass(capsys):
    rig = Rig(SegParams(enabled=True))
    handle = rig.unet.output_blocks[0].register_forward_hook(lambda _m, _a, out: out)
    rig.step()
    handle.remove()
    assert rig.inner.calls == [4, 2]
    assert "another extension hooks Sequence at output_blocks.0" in capsys.readouterr().out


def test_idle_wrappers_are_told_apart_from_active_ones():
    unet = Rig(None).unet
    assert fork_blocker(unet) is None
    block = unet.output_blocks[0]
    block.forward = block.forward  # bound to its own class's method: idle
    assert fork_blocker(unet) is None
    block.forward = MethodType(lambda self, *a: type(self).forward(self, *a), block)
    assert "replaces Sequence.forward at output_blocks.0" in fork_blocker(unet)


def test_separate_pass_sees_the_same_wrapper_as_the_host(capsys):
    """A wrapper on the k-diffusion model that is not SEG's own is never wrapped by SEG (its calls would not
    hold every cond row first), and SEG's extra pass goes through it like the host's call."""
    rig = Rig(SegParams(enabled=True))
    calls = []
    plain = rig.inner.forward

    def other(x, sigma, cond):
        calls.append(x.shape[0])
        return plain(x, sigma, cond=cond)

    rig.inner.forward = other
    rig.step()
    assert calls == [4, 2]
    assert rig.inner.forward is other
    assert isinstance(rig.inner, KDiffusionWrapper)


def test_controlnet_reference_unit_turns_seg_off_with_one_line(capsys):
    """With ControlNet's forward active and its attention hacks installed (a reference unit), no extra pass
    can see the attention state the cond rows saw: SEG says so once and the image is made without it."""
    rig = Rig(SegParams(enabled=True))
    controlnet_hook.hook_unet(rig.unet)
    for block in _transformer(rig.unet, "middle", 0).transformer_blocks:
        controlnet_hook.install(block, controlnet_hook.AutoMachine.Read)
    first, second = rig.step(), rig.step()
    assert torch.equal(first, rig.plain())
    assert torch.equal(second, rig.plain())
    assert rig.inner.calls == [4, 4]  # the host's calls only
    out = capsys.readouterr().out
    assert out.count("SEG is off for this generation: a ControlNet reference unit") == 1
    assert rig.p.extra_generation_params == {}  # the image does not claim SEG


def test_controlnet_unit_without_reference_keeps_seg():
    rig = Rig(SegParams(enabled=True))
    controlnet_hook.hook_unet(rig.unet)
    torch.testing.assert_close(rig.step(), expected(rig, ["m0"]), rtol=1e-9, atol=1e-9)
    assert rig.inner.calls == [6]  # one host call: the branch follows ControlNet's forward


# -- behind ControlNet's forward: the branch follows its loop with the cond rows' control ---------------------
BEHIND_LINE = "behind ControlNet's UNet forward, with the cond rows' control"


@pytest.mark.parametrize(
    ("layers", "sigma", "t2i_after"),
    [
        ("m0", float("inf"), ()),
        ("m0", 2.0, (0, 1, 3)),
        ("d0", float("inf"), (0, 1, 3)),
        ("d1", 2.0, ()),
        ("u0", 2.0, (1,)),
        ("u2", float("inf"), (0, 1, 3)),
        ("d0,u1", 2.0, (0, 1, 3)),
        ("d1,m0,u0", float("inf"), (2,)),
    ],
)
def test_branch_behind_controlnet_equals_the_separate_pass(layers, sigma, t2i_after, capsys):
    """ControlNet's loop adds residuals computed per row (middle, skips, T2I after input blocks); the branch
    forked at the first selected block, in the host's one call, equals a cond-only pass with the same unit
    and the queries smoothed, on an 11x7 latent (the hosts' cat resizes the upsampled rows)."""
    names = layers.split(",")
    rig = Rig(SegParams(enabled=True, layers=layers, blur_sigma=sigma))
    controlnet_hook.hook_unet_with_control(rig.unet, t2i_after=t2i_after)
    cond = torch.stack(rig.cond)
    delta = rig.predict(rig.x, rig.sigma, cond) - rig.predict(rig.x, rig.sigma, cond, names=names, sigma=sigma)
    wanted = rig.plain() + 3.0 * delta
    torch.testing.assert_close(rig.step(), wanted, rtol=1e-9, atol=1e-9)
    assert rig.inner.calls == [6]
    assert delta.abs().max() > 1e-3  # the smoothing moved the image: the comparison can fail
    assert BEHIND_LINE in capsys.readouterr().out


def test_controlnet_that_changes_the_output_after_the_last_block_gets_the_hosts_call_repeated(capsys):
    """Colorfix / inpaint-only blend the UNet's output after its last block: the branch cannot follow that.
    The step repeats the host's call at once (same image), and the later steps go straight to the repeat."""
    rig = Rig(SegParams(enabled=True))
    controlnet_hook.hook_unet_with_control(rig.unet, post_process=True)
    wanted = expected(rig, ["m0"])
    torch.testing.assert_close(rig.step(), wanted, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(rig.step(), wanted, rtol=1e-9, atol=1e-9)
    assert rig.inner.calls == [6, 4, 4]
    out = capsys.readouterr().out
    assert out.count("ControlNet, and the branch cannot follow it: it changes the UNet's output") == 1
    assert out.count("[SEG]") == 1
    assert BEHIND_LINE not in out


@pytest.mark.parametrize("setting", ["seg_fast_path", "hypertile_enable_unet"])
def test_behind_controlnet_the_fast_setting_off_or_hypertile_repeats_the_hosts_call(setting, capsys):
    rig = Rig(SegParams(enabled=True))
    setattr(rig.host.opts(), setting, setting != "seg_fast_path")
    controlnet_hook.hook_unet_with_control(rig.unet, t2i_after=(1,))
    torch.testing.assert_close(rig.step(), expected(rig, ["m0"]), rtol=1e-9, atol=1e-9)
    assert rig.inner.calls == [4, 4]
    assert "the host's call repeated" in capsys.readouterr().out


def test_a_wrapper_that_caches_for_the_hosts_batch_still_gets_seg():
    """ControlNet's inpaint_only caches its latents for the batch size of the first call and fails on
    another: the repeated call has the host's batch, so SEG still applies."""
    rig = Rig(SegParams(enabled=True))
    wanted = expected(rig, ["m0"])  # before the wrapper: it would refuse the reference's batches
    stock = type(rig.unet).forward
    cached = {}

    def forward_webui(self, x, *args, **kwargs):
        batch = cached.setdefault("batch", x.shape[0])
        if x.shape[0] != batch:
            raise RuntimeError(f"cached for {batch} rows, got {x.shape[0]}")
        return stock(self, x, *args, **kwargs)

    rig.unet.forward = MethodType(forward_webui, rig.unet)
    torch.testing.assert_close(rig.step(), wanted, rtol=1e-9, atol=1e-9)
    assert not rig.run.failed
