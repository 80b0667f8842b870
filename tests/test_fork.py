"""The fast path on A1111: the smoothed branch forked from the conditional branch inside the host's UNet call.

``forked_forward`` is checked against the stock forward of a small UNet with the ldm/sgm module layout
(``tests/standins.TinyUNet``), in double precision; ``SegRun`` is checked for when it forks, when it falls
back to the separate extra pass, what it says, and that it leaves nothing behind.
"""

from __future__ import annotations

import math

import pytest
import torch

import seg_lib.host.a1111_same_call as a1111_same_call
from seg_lib.core.blocks import SD1_LAYOUT, resolve_layers
from seg_lib.core.params import SegParams
from seg_lib.families.unet import read_layout
from seg_lib.host.fork import NotRows, StockForward, first_block, forked_forward, stock_forward, with_row_copies
from seg_lib.host.marks import owned
from tests import standins
from tests.standins import CONTEXT, TinyUNet
from tests.test_a1111_adapter import BLOCKS, Rig, _to_q_hooks, reference_smoothing

pytestmark = pytest.mark.usefixtures("float64")

STOCK = StockForward(standins, casts_input=True)


def test_first_block_is_the_first_to_run():
    refs = resolve_layers("u0,m0,d1", read_layout(TinyUNet()))
    assert first_block(refs) == ("input", 3)
    assert first_block(resolve_layers("u2.0,u1", SD1_LAYOUT)) == ("output", 4)  # u<i> counts attention blocks
    assert first_block(resolve_layers("m0.0", SD1_LAYOUT)) == ("middle", 0)


def _batch(seed: int, rows: int, host: int, adm: int | None, height: int = 11, width: int = 7):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(host, 4, height, width, generator=gen)
    t = torch.rand(host, generator=gen) * 10
    context = torch.randn(host, 3, CONTEXT, generator=gen)
    y = None if adm is None else torch.randn(host, adm, generator=gen)
    return x, t, context, y


def _with_copies(t: torch.Tensor | None, rows: int) -> torch.Tensor | None:
    return None if t is None else torch.cat([t, t[:rows]])


@pytest.mark.parametrize(
    "names",
    [["m0"], ["u0"], ["u2"], ["u1", "u2"], ["d0"], ["d1"], ["d0", "u2"], ["d1", "m0", "u0"]],
    ids=lambda n: ",".join(n),
)
@pytest.mark.parametrize("sigma", [1.5, math.inf])
@pytest.mark.parametrize("adm", [None, 5], ids=["sd", "sdxl-y"])
def test_forked_rows_equal_a_separate_smoothed_pass(names, sigma, adm):
    """Middle-only, decoder-only and encoder selections; the host's rows come back untouched."""
    torch.manual_seed(3)
    unet = TinyUNet(adm_in=adm).eval()
    rows, host = 2, 5  # e.g. 2 cond rows (one an AND sub-prompt) + 3 other rows
    x, t, context, y = _batch(7, rows, host, adm)
    at = min((BLOCKS[n] for n in names), key=lambda b: ({"input": 0, "middle": 1, "output": 2}[b[0]], b[1]))
    with torch.no_grad():
        stock_host = unet(x, t, context, y)
        with reference_smoothing(unet, names, sigma):
            stock_seg = unet(x[:rows], t[:rows], context[:rows], None if y is None else y[:rows])
        with reference_smoothing(unet, names, sigma, rows=rows):
            out = forked_forward(
                unet, STOCK, at, rows, _with_copies(x, rows), _with_copies(t, rows), _with_copies(context, rows),
                _with_copies(y, rows),
            )  # fmt: skip
    assert out.shape[0] == host + rows
    torch.testing.assert_close(out[:host], stock_host, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[host:], stock_seg, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        unsmoothed = unet(x[:rows], t[:rows], context[:rows], None if y is None else y[:rows])
    assert (out[host:] - unsmoothed).abs().max() > 1e-3  # the copies really were smoothed


def test_the_fork_runs_the_blocks_before_it_on_the_host_rows_only():
    unet = TinyUNet().eval()
    x, t, context, _ = _batch(1, 2, 4, None)
    seen: dict[str, int] = {}

    def record(name):
        return lambda _m, args: seen.__setitem__(name, args[0].shape[0])

    handles = [block.register_forward_pre_hook(record(f"input{i}")) for i, block in enumerate(unet.input_blocks)]
    handles.append(unet.middle_block.register_forward_pre_hook(record("middle")))
    handles += [block.register_forward_pre_hook(record(f"output{i}")) for i, block in enumerate(unet.output_blocks)]
    with torch.no_grad():
        forked_forward(unet, STOCK, ("middle", 0), 2, *(_with_copies(v, 2) for v in (x, t, context)))
    for handle in handles:
        handle.remove()
    assert [seen[f"input{i}"] for i in range(5)] == [4] * 5  # the encoder is not run again
    assert seen["middle"] == 6
    assert [seen[f"output{i}"] for i in range(5)] == [6] * 5


def test_the_hosts_cat_is_the_one_used():
    """A1111 mends odd latent sizes in ``openaimodel.th.cat``; the fork must go through it as the stock one."""
    unet = TinyUNet().eval()
    x, t, context, _ = _batch(2, 1, 2, None, height=9, width=5)  # 9 -> 5 -> 3 -> up 6 != 5: needs the mend
    calls = []
    original = standins.th.cat

    class Counting:
        def __getattr__(self, item):
            return getattr(standins.th, item)

        def cat(self, tensors, *args, **kwargs):
            calls.append(1)
            return original(tensors, *args, **kwargs)

    namespace = type("Namespace", (), {"th": Counting(), "timestep_embedding": standins.timestep_embedding})
    with torch.no_grad():
        out = forked_forward(
            unet, StockForward(namespace, True), ("middle", 0), 1, *(_with_copies(v, 1) for v in (x, t, context))
        )
    assert out.shape == (3, 4, 9, 5)
    assert len(calls) >= len(unet.output_blocks)


# -- when the forward is not the stock one ------------------------------------------------------------------
def test_stock_forward_is_recognised_and_others_are_named():
    unet = TinyUNet()
    stock = {TinyUNet.forward: True}
    found = stock_forward(unet, stock)
    assert isinstance(found, StockForward)
    assert found.namespace is standins
    assert found.casts_input

    class OwnForward(TinyUNet):
        def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
            return super().forward(x, timesteps, context, y)

    assert "forward of its own" in stock_forward(OwnForward(), stock)
    wrapped = TinyUNet()
    wrapped.forward = lambda *a, **k: TinyUNet.forward(wrapped, *a, **k)  # ControlNet's way
    assert "wraps the UNet's forward" in stock_forward(wrapped, stock)
    hooked = TinyUNet()
    hooked.register_forward_pre_hook(lambda m, a: None)
    assert "hooks" in stock_forward(hooked, stock)


def _fast_rig(**kw) -> Rig:
    return Rig(SegParams(enabled=True, **kw), fast=True)


def test_controlnet_style_wrapper_repeats_the_hosts_call(capsys):
    """An active wrapper of the UNet's forward (ControlNet) may keep what it computed for the host's batch:
    SEG's branch repeats the host's call as it was (same batch), the cond rows smoothed."""
    rig = _fast_rig()
    stock = rig.unet.forward
    rig.unet.forward = lambda *a, **k: stock(*a, **k)  # another extension owns the forward
    fast = rig.step()
    rig.step()
    assert rig.inner.calls == [4, 4, 4, 4]
    out = capsys.readouterr().out
    assert out.count("separate extra UNet pass per step (another extension wraps the UNet's forward") == 1
    reference = Rig(SegParams(enabled=True), fast=False)
    torch.testing.assert_close(fast, reference.step(), rtol=1e-9, atol=1e-9)
    assert rig.unet.forward is not stock
    assert "forward" in vars(rig.unet)


def test_custom_unet_falls_back(capsys):
    rig = _fast_rig()
    rig.host.custom_unet = True
    rig.step()
    assert rig.inner.calls == [4, 2]
    assert "a custom UNet (TensorRT?) is active" in capsys.readouterr().out


def test_setting_off_takes_the_separate_pass(capsys):
    rig = Rig(SegParams(enabled=True), fast=False)
    rig.step()
    rig.step()
    assert rig.inner.calls == [4, 2, 4, 2]
    assert capsys.readouterr().out.count("the fast SEG setting is off") == 1


def test_the_path_is_said_once_per_generation(capsys):
    rig = _fast_rig()
    for step in range(3):
        rig.step(step=step, steps=3)
    assert rig.inner.calls == [6, 6, 6]
    assert capsys.readouterr().out.count("[SEG] fast path, forked from the conditional branch at middle") == 1


def test_rows_split_over_calls_fall_back_and_say_so(capsys):
    """ "Batch cond/uncond" off with an AND prompt: no call holds every cond row first, so no fork."""
    rig = _fast_rig()
    conds = rig.conds([[0.7, 0.3], [1.0]])
    result = rig.step(conds=conds, batch_cond_uncond=False)
    assert rig.inner.calls == [2, 2, 1, 3]  # the host's three calls, then the separate cond-only pass
    assert "split this step's rows over several calls" in capsys.readouterr().out
    reference = Rig(SegParams(enabled=True), fast=False)
    torch.testing.assert_close(result, reference.step(conds=reference.conds([[0.7, 0.3], [1.0]])), rtol=1e-9, atol=1e-9)


def test_unbatched_calls_still_fork_when_the_first_holds_every_cond_row():
    rig = _fast_rig()
    result = rig.step(batch_cond_uncond=False)
    assert rig.inner.calls == [4, 2]  # cond rows + their copies, then the uncond rows
    torch.testing.assert_close(result, Rig(SegParams(enabled=True), fast=False).step(), rtol=1e-9, atol=1e-9)


def test_no_module_sees_more_than_three_rows_per_image():
    rig = _fast_rig(layers="d0")  # the earliest fork: the most work on extra rows
    most = [0]

    @owned  # a measuring probe, not another extension's hook (which would rule the fork out)
    def record(_m, args):
        if args and isinstance(args[0], torch.Tensor):
            most[0] = max(most[0], args[0].shape[0])

    handles = [m.register_forward_pre_hook(record) for m in rig.unet.modules() if m is not rig.unet]
    rig.step()
    for handle in handles:
        handle.remove()
    assert most[0] == 3 * 2  # 2 images: cond, uncond and the smoothed copy each


# -- errors and interrupts leave nothing behind ---------------------------------------------------------------
def test_an_error_in_the_fork_still_makes_the_image(monkeypatch, capsys):
    rig = _fast_rig()

    def broken(*args, **kwargs):
        raise RuntimeError("fork broke")

    monkeypatch.setattr(a1111_same_call, "forked_forward", broken)
    first, second = rig.step(), rig.step()
    assert torch.equal(first, rig.plain())
    assert torch.equal(second, rig.plain())
    assert rig.run.failed
    assert rig.p.extra_generation_params == {}
    assert capsys.readouterr().out.count("fork broke") == 1
    assert "forward" not in vars(rig.unet)
    assert _to_q_hooks(rig.unet) == 0


class Interrupt(BaseException):
    """Like a KeyboardInterrupt: not an Exception, so it goes through SEG's handlers to the host."""


def test_an_interrupt_inside_the_call_leaves_no_patch(monkeypatch):
    rig = _fast_rig()

    def interrupted(*args, **kwargs):
        raise Interrupt

    monkeypatch.setattr(a1111_same_call, "forked_forward", interrupted)
    with pytest.raises(Interrupt):
        rig.step()
    assert "forward" not in vars(rig.unet)
    assert _to_q_hooks(rig.unet) == 0
    monkeypatch.undo()
    off = Rig(None, unet=rig.unet)
    off.x = rig.x
    assert torch.equal(off.step(), rig.plain())  # the next generation, SEG off: as if SEG never ran


def test_outside_the_window_the_hosts_call_is_untouched():
    """The sampler's model wrapper stays wrapped for its pass, and passes calls through when no fork is armed."""
    rig = _fast_rig(start=0.0, end=0.0)  # SEG only at step 0
    rig.step(step=0, steps=3)
    assert "forward" in vars(rig.inner)  # wrapped for this sampling pass
    later = rig.step(step=1, steps=3)
    assert rig.inner.calls == [6, 4]
    torch.testing.assert_close(later, rig.plain(), rtol=0, atol=0)


def test_a_model_without_label_embedding_is_fine_with_y_none():
    unet = TinyUNet().eval()
    x, t, context, _ = _batch(4, 1, 2, None)
    with torch.no_grad():
        out = forked_forward(unet, STOCK, ("output", 0), 1, *(_with_copies(v, 1) for v in (x, t, context)))
        torch.testing.assert_close(out[:2], unet(x, t, context), rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out[2:], unet(x[:1], t[:1], context[:1]), rtol=1e-10, atol=1e-10)


def test_row_copies_of_the_hosts_call_arguments():
    cond = {"c_crossattn": [torch.arange(6.0).reshape(3, 2)], "c_concat": [torch.zeros(3, 5, 1, 1)]}
    copied = with_row_copies((torch.arange(3.0), cond), 3, 2)
    assert torch.equal(copied[0], torch.tensor([0.0, 1.0, 2.0, 0.0, 1.0]))
    assert torch.equal(copied[1]["c_crossattn"][0][3:], cond["c_crossattn"][0][:2])
    assert copied[1]["c_concat"][0].shape == (5, 5, 1, 1)
    for bad in ({"flag": "yes"}, torch.zeros(2, 4), torch.tensor(1.0)):
        with pytest.raises(NotRows):
            with_row_copies(bad, 3, 2)


@pytest.mark.parametrize("sigma", [2.0, math.inf])
def test_skip_early_cfg_steps_fork_too(sigma, capsys):
    """On skip-uncond steps the host passes image_cond with the uncond rows still in it: the fork cuts them."""
    rig = _fast_rig(blur_sigma=sigma)
    result = rig.step(skip_uncond=True)
    assert rig.inner.calls == [4]  # 2 cond rows + their 2 copies, one call
    assert "fast path, forked from the conditional branch" in capsys.readouterr().out
    reference = Rig(SegParams(enabled=True, blur_sigma=sigma), fast=False)
    torch.testing.assert_close(result, reference.step(skip_uncond=True), rtol=1e-9, atol=1e-9)
    assert reference.inner.calls == [2, 2]
