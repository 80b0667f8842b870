"""SEG's branch forked behind another extension's UNet forward that runs the blocks itself (sd-webui-controlnet).

ControlNet's hooked forward computes its control for the batch, then runs the UNet's blocks in its own loop
and adds its residuals between them: onto the middle block's output, onto each skip, and (T2I adapters) onto
some input blocks' outputs. SEG cannot stand in for that forward, but it can watch it. During the host's own
call, hooks record the cond rows entering and leaving each block from the fork point on. Then the branch
runs those blocks once more for copies of the cond rows, queries smoothed, and gives each block what the
loop added for the cond row it copies: the difference between what entered a block and what the block
before it gave (for an output block, for its skip half too). So the branch gets the cond rows' control.

That is exact when what the loop adds does not depend on the hidden state, as with ControlNet's and T2I
adapters' residuals. ``host_output_matches`` catches a forward that changes the output after the last
block (ControlNet's colorfix and inpaint-only blending): the caller then repeats the host's call instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from seg_lib.host.marks import owned

Key = tuple[str, int]  # ("input", i), ("middle", 0), ("output", j)


class NotTail(RuntimeError):
    """The host's forward did not run the blocks the way the branch can follow."""


def run_order(unet: nn.Module) -> list[Key]:
    """The blocks of an ldm/sgm UNet in the order its forward runs them."""
    inputs = [("input", i) for i in range(len(unet.input_blocks))]
    return [*inputs, ("middle", 0), *(("output", j) for j in range(len(unet.output_blocks)))]


def _block(unet: nn.Module, key: Key) -> nn.Module:
    part, index = key
    return unet.middle_block if part == "middle" else getattr(unet, f"{part}_blocks")[index]


def _skip_entry(unet: nn.Module, key: Key) -> Key:
    """For output block ``key``: the block whose input the host's skip is (the input block's output, with
    whatever the loop added to it, goes both onto the skip stack and into the next block)."""
    source = len(unet.input_blocks) - 1 - key[1]
    return ("input", source + 1) if source + 1 < len(unet.input_blocks) else ("middle", 0)


def _resized(h: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """``h`` at the skip's size, as the hosts' ``th.cat`` (A1111's and ControlNet's) makes it for sizes that
    are not multiples of 64: the nearest pixel."""
    return h if h.shape[-2:] == skip.shape[-2:] else nn.functional.interpolate(h, skip.shape[-2:], mode="nearest")


@dataclass
class Recording:
    """The first ``rows`` rows entering (hidden state, embedding, context) and leaving each watched block."""

    rows: int
    entered: dict[Key, tuple[torch.Tensor, Any, Any]] = field(default_factory=dict)
    left: dict[Key, torch.Tensor] = field(default_factory=dict)
    calls: list[Key] = field(default_factory=list)
    out_input: torch.Tensor | None = None

    def cut(self, value: Any) -> Any:
        return value[: self.rows] if isinstance(value, torch.Tensor) and value.ndim else value


@contextlib.contextmanager
def recording(unet: nn.Module, at: Key, rows: int) -> Iterator[Recording]:
    """Record the blocks from ``at`` on, and the input of ``unet.out``, for one call of the host's forward."""
    order = run_order(unet)
    rec = Recording(rows)

    def watch(key: Key) -> tuple[Any, Any]:
        @owned
        def enter(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            emb = args[1] if len(args) > 1 else kwargs.get("emb")
            context = args[2] if len(args) > 2 else kwargs.get("context")
            rec.calls.append(key)
            rec.entered[key] = (args[0][:rows].clone(), rec.cut(emb), rec.cut(context))

        @owned
        def leave(_module: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            rec.left[key] = out[:rows].clone()

        return enter, leave

    @owned
    def enter_out(_module: nn.Module, args: tuple) -> None:
        rec.out_input = args[0][:rows].clone()

    handles = []
    try:
        for key in order[order.index(at) :]:
            enter, leave = watch(key)
            block = _block(unet, key)
            handles += [block.register_forward_pre_hook(enter, with_kwargs=True), block.register_forward_hook(leave)]
        handles.append(unet.out.register_forward_pre_hook(enter_out))
        yield rec
    finally:
        for handle in handles:
            handle.remove()


def tail_forward(unet: nn.Module, rec: Recording, at: Key) -> torch.Tensor:
    """The UNet's output for copies of the recorded rows, run again from block ``at`` on (the caller's query
    hooks smooth them), with what the host's loop added between the blocks carried over."""
    order = run_order(unet)
    keys = order[order.index(at) :]
    if rec.calls != keys or rec.out_input is None:
        raise NotTail("the UNet's forward did not run its blocks once each, in order")
    branch_in: dict[Key, torch.Tensor] = {}
    out = None
    for before, key in zip([None, *keys], keys, strict=False):
        entered, emb, context = rec.entered[key]
        if before is None:
            h = entered
        elif key[0] == "output":
            width = rec.left[before].shape[1]
            skip = entered[:, width:]
            source = _skip_entry(unet, key)
            if source in branch_in:  # a skip made after the fork: the branch's own, with the same addition
                skip = branch_in[source] + (skip - rec.entered[source][0])
            came = _resized(out, skip) + (entered[:, :width] - _resized(rec.left[before], skip))
            h = torch.cat([came, skip], dim=1)
        else:
            h = out + (entered - rec.left[before])
        branch_in[key] = h
        out = _block(unet, key)(h, emb, context)
    last = rec.left[keys[-1]].type(rec.out_input.dtype)
    return unet.out(out.type(rec.out_input.dtype) + (rec.out_input - last))


def host_output_matches(unet: nn.Module, rec: Recording, host_rows: torch.Tensor) -> bool:
    """Whether the host's output for the recorded rows is the UNet's ``out`` of what entered it (nothing was
    changed after the last block), to the precision of a batch of another size."""
    if rec.out_input is None:
        return False
    expected = unet.out(rec.out_input)
    if expected.shape != host_rows.shape:
        return False
    error = (expected - host_rows.to(expected.dtype)).abs().max()
    return bool(error <= 1e-3 * (1 + expected.abs().max()))
