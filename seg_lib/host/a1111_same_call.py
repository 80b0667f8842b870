"""A1111's same-call path: the smoothed branch rides in the host's own model call.

``a1111_paths.plan_step`` arms one plan per step (``Fork``, ``Tail`` or ``Replay``) and wraps the ``forward``
of the sampler's model wrapper (``wrap_inner``). The host's next model call of that step, when it holds every
cond row first, then carries the plan out: the cond rows' copies appended and the UNet's forward replaced
for the duration of that call, forked (``fork.py``) or, behind ControlNet's forward, followed
(``tail_fork.py``); or, behind another extension's forward, the host's call repeated with the cond rows
smoothed. The branch's rows land on ``run.cond_seg`` for the guidance (``a1111_guidance.py``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from seg_lib.host.a1111_smoothing import Targets
from seg_lib.host.fork import NotRows, StockForward, forked_forward, with_row_copies
from seg_lib.host.tail_fork import NotTail, host_output_matches, recording, tail_forward

if TYPE_CHECKING:
    from seg_lib.host.a1111 import SegRun


@dataclass(frozen=True)
class Fork:
    """This step's plan for the fast path: fork ``rows`` cond rows at block ``at`` of ``unet``."""

    unet: nn.Module
    stock: StockForward
    at: tuple[str, int]
    rows: int
    batches: tuple[int, ...]  # the host call sizes that hold every cond row first: all rows, or cond only
    targets: Targets


@dataclass(frozen=True)
class Tail:
    """This step's plan behind ControlNet's forward: watch the host's call, then run the branch from ``at``."""

    unet: nn.Module
    at: tuple[str, int]
    rows: int
    batches: tuple[int, ...]
    targets: Targets


@dataclass(frozen=True)
class Replay:
    """This step's plan when another extension owns the UNet's forward: repeat the host's call."""

    rows: int
    batches: tuple[int, ...]
    targets: Targets


Plan = Fork | Tail | Replay


def cannot_follow(run: SegRun) -> str:
    return f"ControlNet, and the branch cannot follow it: {run.no_tail}"


def say_repeated(run: SegRun, why: str | None) -> None:
    run.plain_path(f"another extension wraps the UNet's forward ({why}): the host's call repeated")


def wrap_inner(run: SegRun, inner: Any) -> bool:
    """Route the host's model call through ``call_with_branch`` / ``replayed_call`` when this step's plan is
    armed; False (with the console line) when the sampler's model cannot be wrapped."""
    if not isinstance(inner, nn.Module):
        run.plain_path("the sampler's model wrapper is not a torch module")
        return False
    if getattr(inner, "seg_wrapped_by", None) is run:
        return True
    if "forward" in vars(inner) and not isinstance(getattr(inner, "seg_wrapped_by", None), type(run)):
        run.plain_path("another extension wraps the sampler's model (Tiled Diffusion?)")
        return False
    plain = inner.forward

    @functools.wraps(plain)
    def forward(*args: Any, **kwargs: Any) -> Any:
        plan, run.plan = run.plan, None  # only the step's first call can hold every cond row first
        if plan is None or run.failed or not args or args[0].shape[0] not in plan.batches:
            return plain(*args, **kwargs)
        if isinstance(plan, Replay):
            return replayed_call(run, plan, plain, args, kwargs)
        return call_with_branch(run, plan, plain, args, kwargs)

    inner.forward = forward
    inner.seg_wrapped_by = run
    return True


def replayed_call(run: SegRun, replay: Replay, plain: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """The host's call, then the same call again with the cond rows (its first rows) smoothed."""
    out = plain(*args, **kwargs)
    blurred = [0]
    try:
        with (
            run.host.extra_call(run.call_state),
            run.smoothing(replay.targets, blurred, rows=slice(0, replay.rows)),
        ):
            again = plain(*args, **kwargs)
    except Exception as error:  # SEG must never break the user's generation: the host's output stands
        run.give_up(f"SEG failed and is off for the rest of this generation: {error!r}")
        return out
    run.forking = "ran"
    if blurred[0]:
        run.cond_seg = again[: replay.rows]
    return out


def call_with_branch(run: SegRun, plan: Fork | Tail, plain: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """The host's call with the cond rows' copies appended, the UNet's forward replaced for its duration:
    forked (``fork.py``) or, behind ControlNet's forward, followed (``tail_fork.py``)."""
    batch = args[0].shape[0]
    try:
        more_args = with_row_copies(args, batch, plan.rows, cut=True)
        more_kwargs = with_row_copies(kwargs, batch, plan.rows, cut=True)
    except NotRows as error:
        run.forking = "no"
        run.plain_path(f"the model call has {error}")
        return plain(*args, **kwargs)

    blurred = [0]
    previous = vars(plan.unet).get("forward")  # an idle wrapper another extension keeps there stays
    if isinstance(plan, Fork):
        plan.unet.forward = _forked(plan)
        smoothing = run.smoothing(plan.targets, blurred, rows=slice(-plan.rows, None))
    else:
        plan.unet.forward = _followed(run, plan, previous, blurred)
        smoothing = contextlib.nullcontext()
    try:
        with smoothing:
            out = plain(*more_args, **more_kwargs)
    except Exception as error:  # SEG must never break the user's generation: redo the host's call as is
        out = error
    finally:
        if previous is None:
            vars(plan.unet).pop("forward", None)
        else:
            plan.unet.forward = previous
    if isinstance(out, Exception):
        run.give_up(f"SEG failed and is off for the rest of this generation: {out!r}")
        return plain(*args, **kwargs)
    run.forking = "ran"
    if blurred[0]:
        part, index = plan.at
        behind = " behind ControlNet's UNet forward, with the cond rows' control" if isinstance(plan, Tail) else ""
        if not (behind and run.no_tail):  # else the branch could not follow and the call was repeated
            run.say_once("path:fork", f"fast path, forked from the conditional branch at {part} block {index}{behind}")
        run.cond_seg = out[batch:]
    # else: no selected layer could be smoothed on this step (said per layer); no SEG term this step
    return out[:batch]


def _forked(fork: Fork) -> Callable[..., torch.Tensor]:
    def forward(x: torch.Tensor, timesteps: Any = None, context: Any = None, y: Any = None, **_: Any) -> Any:
        return forked_forward(fork.unet, fork.stock, fork.at, fork.rows, x, timesteps, context, y)

    return forward


def _followed(run: SegRun, tail: Tail, wrapper: Any, blurred: list[int]) -> Callable[..., torch.Tensor]:
    """ControlNet's forward over the host's rows, watched; then the branch's rows from ``tail.at`` on."""

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        total = args[0].shape[0]

        def cut(value: Any) -> Any:
            is_rows = isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == total
            return value[: total - tail.rows] if is_rows else value

        args, kwargs = tuple(cut(v) for v in args), {k: cut(v) for k, v in kwargs.items()}
        with recording(tail.unet, tail.at, tail.rows) as rec:
            out = wrapper(*args, **kwargs)
        try:
            with run.smoothing(tail.targets, blurred):
                branch = tail_forward(tail.unet, rec, tail.at)
            if not host_output_matches(tail.unet, rec, out[: tail.rows]):
                raise NotTail("it changes the UNet's output after the last block")
        except NotTail as error:
            run.no_tail = str(error)
            say_repeated(run, cannot_follow(run))
            blurred[0] = 0
            rows = slice(0, tail.rows)
            with run.host.extra_call(run.call_state), run.smoothing(tail.targets, blurred, rows=rows):
                branch = wrapper(*args, **kwargs)[rows]
        return torch.cat([out, branch])

    return forward
