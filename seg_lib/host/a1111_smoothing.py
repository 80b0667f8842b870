"""The selected layers of an A1111 UNet, and the query hooks of one call: their queries smoothed on its grid."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from seg_lib.core.blocks import LayerRef
from seg_lib.core.blur import is_infinite
from seg_lib.families.unet import attn1_module, spatial_transformer
from seg_lib.host.one_query import one_query_attn1
from seg_lib.host.run import Run


@dataclass(frozen=True)
class Target:
    """One selected attn1 layer of a loaded UNet, with the SpatialTransformer whose input holds its grid."""

    ref: LayerRef
    attn1: nn.Module
    transformer: nn.Module


Targets = list[Target]


def layer_targets(run: Run, unet: nn.Module | None) -> Targets | None:
    """The layers the run's settings select in ``unet``, or None (SEG given up: ``Run.selected_layers``)."""
    refs = run.selected_layers(unet)
    if refs is None:
        return None
    return [Target(ref, attn1_module(unet, ref), spatial_transformer(unet, ref)) for ref in refs]


@contextlib.contextmanager
def query_smoothing(
    run: Run, targets: Targets, blurred: list[int], rows: slice | None = None, why: str = ""
) -> Iterator[None]:
    """Hooks on each selected layer for the duration of one UNet call: its SpatialTransformer's input
    tells the grid of this very call (Deep Shrink, tiles and hires passes change it), and ``attn1.to_q``
    smooths the ``rows`` rows of the queries on it (all rows when None). ``why`` names what may regroup the
    tokens, for the console line of a skipped layer."""
    grids: dict[int, tuple[int, int]] = {}

    # sigma = inf: attention for one mean query per row (one_query.py), on layers whose attn1 no other
    # extension wraps (Hypertile draws its tiles at every call: a split call would draw them twice)
    one_query = {id(t.attn1) for t in targets if is_infinite(run.params.blur_sigma) and "forward" not in vars(t.attn1)}
    state = {"one": False}

    def see_grid(module: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].ndim == 4:
            grids[id(module)] = tuple(args[0].shape[-2:])

    def hook_for(target: Target) -> Callable[..., torch.Tensor]:
        def smooth(_module: nn.Module, _args: object, q: torch.Tensor) -> torch.Tensor:
            if id(target.attn1) in one_query:  # its forward passes the rows to smooth alone, state["one"] set
                grid = grids.get(id(target.transformer))
                smoothed = run.smoothed(target.ref, q, grid, why) if state["one"] else None
                blurred[0] += smoothed is not None
                return q if smoothed is None else smoothed[:, :1]
            part = q if rows is None else q[rows]
            smoothed = run.smoothed(target.ref, part, grids.get(id(target.transformer)), why)
            if smoothed is None:
                return q
            blurred[0] += 1
            if rows is None:
                return smoothed
            part.copy_(smoothed)  # the branch's rows only, in place: the host's rows are untouched
            return q

        return smooth

    transformers = {id(target.transformer): target.transformer for target in targets}
    handles = [module.register_forward_pre_hook(see_grid) for module in transformers.values()]
    try:
        handles += [target.attn1.to_q.register_forward_hook(hook_for(target)) for target in targets]
        with one_query_attn1([t.attn1 for t in targets if id(t.attn1) in one_query], rows, state):
            yield
    finally:
        for handle in handles:
            handle.remove()
