"""The branch that follows another extension's UNet loop (host/tail_fork.py), on the ldm-layout stand-in.
Its exactness next to ControlNet's loop is tested through the A1111 adapter in test_combinations_a1111.py."""

from __future__ import annotations

from types import MethodType

import pytest
import torch

import tests.hook as controlnet_hook
from seg_lib.host.tail_fork import NotTail, host_output_matches, recording, run_order, tail_forward
from tests.standins import CONTEXT, TinyUNet

pytestmark = pytest.mark.usefixtures("float64")


def _inputs(rows: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(rows, 4, 11, 7, generator=gen), torch.full((rows,), 500.0), torch.randn(rows, 3, CONTEXT)


def _hooks(unet: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in unet.modules())


@pytest.mark.parametrize("at", [("input", 0), ("input", 3), ("middle", 0), ("output", 4)])
def test_without_smoothing_the_branch_is_the_cond_rows_output(at):
    """Unsmoothed, the followed branch must reproduce the host's own output for the rows it copies."""
    unet = TinyUNet().eval()
    controlnet_hook.hook_unet_with_control(unet, t2i_after=(0, 2))
    x, t, context = _inputs()
    with torch.no_grad():
        with recording(unet, at, 2) as rec:
            host = unet(x, t, context=context)
        branch = tail_forward(unet, rec, at)
    torch.testing.assert_close(branch, host[:2], rtol=1e-12, atol=1e-12)
    assert host_output_matches(unet, rec, host[:2])
    assert _hooks(unet) == 0


def test_a_loop_that_runs_a_block_twice_is_not_followed():
    unet = TinyUNet().eval()
    stock = type(unet).forward

    def forward_webui(self, x, *args, **kwargs):
        self.middle_block(torch.zeros(x.shape[0], 8, 3, 2), torch.zeros(x.shape[0], 8), kwargs.get("context"))
        return stock(self, x, *args, **kwargs)

    unet.forward = MethodType(forward_webui, unet)
    x, t, context = _inputs()
    with torch.no_grad(), recording(unet, ("middle", 0), 2) as rec:
        unet(x, t, context=context)
    with pytest.raises(NotTail, match="once each, in order"):
        tail_forward(unet, rec, ("middle", 0))


def test_an_output_changed_after_the_last_block_is_caught():
    unet = TinyUNet().eval()
    controlnet_hook.hook_unet_with_control(unet, post_process=True)
    x, t, context = _inputs()
    with torch.no_grad(), recording(unet, ("middle", 0), 2) as rec:
        host = unet(x, t, context=context)
    assert not host_output_matches(unet, rec, host[:2])


def test_the_recording_hooks_go_even_when_the_call_fails():
    unet = TinyUNet().eval()
    with pytest.raises(RuntimeError), recording(unet, ("input", 1), 1):
        unet(torch.zeros(1, 5, 11, 7), torch.zeros(1), context=torch.zeros(1, 3, CONTEXT))  # wrong channels
    assert _hooks(unet) == 0


def test_run_order_is_the_forwards_order():
    unet = TinyUNet()
    order = run_order(unet)
    assert order[0] == ("input", 0)
    assert order[-1] == ("output", len(unet.output_blocks) - 1)
    assert order[len(unet.input_blocks)] == ("middle", 0)
