"""Which path a step of SEG takes on A1111, decided before the host's model call from what is installed.

In the host's own call: forked from the first SEG block on (the stock ldm/sgm forward), followed behind
sd-webui-controlnet's forward, or the host's call repeated behind another extension's forward (the plans of
``a1111_same_call.py``). Otherwise no plan: the step takes the separate extra UNet pass
(``a1111_guidance.py``), with one console line saying why.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import nn

from seg_lib.host.a1111_host import cond_rows
from seg_lib.host.a1111_others import controlnet_forward, fork_blocker, idle_forward
from seg_lib.host.a1111_same_call import Fork, Plan, Replay, Tail, cannot_follow, say_repeated, wrap_inner
from seg_lib.host.a1111_smoothing import Targets
from seg_lib.host.fork import first_block, stock_forward
from seg_lib.settings import fast_path_enabled

if TYPE_CHECKING:
    from seg_lib.host.a1111 import SegRun


def plan_step(run: SegRun, params: Any) -> Plan | None:
    """This step's plan for the host's next model call (``params``: its CFGDenoiserParams), or None."""
    unet = run.host.unet()
    targets = run.targets_for(unet)
    if targets is None:
        return None
    own = vars(unet).get("forward")
    if own is not None and not idle_forward(unet, own) and not run.host.custom_unet_active():
        return _plan_behind(run, params, unet, targets)
    if not fast_path_enabled(run.host.opts()):
        run.plain_path("the fast SEG setting is off")
        return None
    stock = "a custom UNet (TensorRT?) is active" if run.host.custom_unet_active() else None
    stock = stock or stock_forward(unet, run.host.stock_forwards())
    if isinstance(stock, str):
        run.plain_path(stock)
        return None
    blocker = fork_blocker(unet)
    if blocker is not None:
        run.plain_path(blocker)
        return None
    if not wrap_inner(run, params.denoiser.inner_model):
        return None
    rows = cond_rows(params.text_cond)
    at = first_block(target.ref for target in targets)
    return Fork(unet, stock, at, rows, (params.x.shape[0], rows), targets)


def _plan_behind(run: SegRun, params: Any, unet: nn.Module, targets: Targets) -> Tail | Replay | None:
    """Another extension's wrapper owns the UNet's forward (an active ControlNet unit). Such wrappers keep
    what they compute for the batch of the host's call (ControlNet caches its inpaint and reference
    latents for that batch size), so the host's call keeps its batch. Behind ControlNet's own forward the
    branch follows it from the first SEG block on (``tail_fork.py``); behind anything else, or when it
    could not, SEG's branch repeats the host's call as it was, the cond rows smoothed."""
    if not wrap_inner(run, params.denoiser.inner_model):
        return None
    rows = cond_rows(params.text_cond)
    batches = (params.x.shape[0], rows)
    why = _tail_blocker(run, unet)
    if why is None:
        return Tail(unet, first_block(target.ref for target in targets), rows, batches, targets)
    say_repeated(run, why)
    return Replay(rows, batches, targets)


def _tail_blocker(run: SegRun, unet: nn.Module) -> str | None:
    if not controlnet_forward(vars(unet)["forward"]):
        return "ControlNet?"
    if not fast_path_enabled(run.host.opts()):
        return "ControlNet; the fast SEG setting is off"
    if run.no_tail:
        return cannot_follow(run)
    if "Hypertile" in run.host.token_regrouping():  # it draws tiles per attention call: the order matters
        return "ControlNet, with Hypertile"
    blocker = fork_blocker(unet)
    return None if blocker is None else f"ControlNet, and {blocker}"
