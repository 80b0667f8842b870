"""The forked UNet forward: SEG's branch computed inside the host's own UNet call, from the first SEG block on.

SEG's extra branch is the conditional branch with the queries of some layers smoothed, so everything the UNet
computes before the first smoothed block is the same for both. The forked forward runs the stock ldm/sgm
``UNetModel.forward`` on the host's rows and, at the first selected block, appends copies of the conditional
rows of the hidden state, the time embedding and the context; each skip activation gets the same copies when
it is consumed after that point. Only the copies are smoothed (the caller's query hook sees which rows they
are). Everything is batch-independent in the UNet, so the copies' output equals a separate conditional pass
with smoothed queries, to float tolerance.

The caller hands in a batch whose last ``rows`` rows already are copies of its first ``rows`` rows (so the
host's wrapper scales and converts them like any other row); the forward drops them on entry and makes them
again at the fork point, which is where the saving comes from.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from seg_lib.core.blocks import LayerRef
from seg_lib.host.a1111_others import idle_forward

_PART_ORDER = {"input": 0, "middle": 1, "output": 2}


def first_block(refs: Iterable[LayerRef]) -> tuple[str, int]:
    """The block (part, index) that runs first among the selected layers: where the branch forks."""
    ref = min(refs, key=lambda r: (_PART_ORDER[r.part], r.index))
    return ref.part, ref.index


@dataclass(frozen=True)
class StockForward:
    """What the forked forward needs to know of the stock forward it stands in for."""

    namespace: ModuleType  # the UNet's module: the host patches ``th`` (cat) and ``timestep_embedding`` there
    casts_input: bool  # ldm casts x to the UNet's dtype on entry; sgm does not


def stock_forward(unet: nn.Module, stock: Mapping[Callable[..., Any], bool]) -> StockForward | str:
    """The stock forward ``unet`` runs, or why it does not run one (the fork is then off).

    ``stock`` maps each forward function known to be the stock one (the host's own patched wrapper included)
    to whether it casts the input. A ``forward`` instance attribute that only forwards to the class's own
    (what sd-webui-controlnet leaves after a generation) counts as the stock forward."""
    forward = type(unet).forward
    if forward not in stock:
        return f"its UNet class {type(unet).__name__} has a forward of its own"
    own = vars(unet).get("forward")
    if own is not None and not idle_forward(unet, own):
        return "another extension wraps the UNet's forward (ControlNet?)"
    if unet._forward_hooks or unet._forward_pre_hooks:
        return "another extension hooks the UNet's forward"
    if getattr(unet, "predict_codebook_ids", False):
        return "the UNet predicts codebook ids"
    namespace = sys.modules.get(type(unet).__module__)
    if namespace is None or not hasattr(namespace, "timestep_embedding"):
        return "the UNet's module has no timestep_embedding"
    return StockForward(namespace, stock[forward])


class NotRows(ValueError):
    """A model-call argument that is not laid out one row per batch entry."""


def with_row_copies(value: Any, batch: int, rows: int, *, cut: bool = False) -> Any:
    """``value`` (a tensor, or lists/dicts of them, one row per batch entry) with copies of its first
    ``rows`` rows appended. ``cut``: a tensor with more rows than the batch is cut to the batch first (on
    A1111's skip-early-CFG and NGMS steps x loses its uncond rows but image_cond keeps them; those rows
    belong to no row of the call)."""
    if isinstance(value, torch.Tensor):
        if cut and value.ndim and value.shape[0] > batch:
            value = value[:batch]
        if value.ndim == 0 or value.shape[0] != batch:
            raise NotRows(f"a tensor of shape {tuple(value.shape)} in a batch of {batch}")
        return torch.cat([value, value[:rows]])
    if isinstance(value, list | tuple):
        return type(value)(with_row_copies(item, batch, rows, cut=cut) for item in value)
    if isinstance(value, dict):
        return {key: with_row_copies(item, batch, rows, cut=cut) for key, item in value.items()}
    raise NotRows(f"a {type(value).__name__}")


def forked_forward(
    unet: nn.Module,
    stock: StockForward,
    at: tuple[str, int],
    rows: int,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    context: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """The stock forward over ``x[:-rows]``, with the branch of the first ``rows`` rows forked at block ``at``.

    Returns all ``len(x)`` rows in the order they came: the host's, then the branch's."""
    host = x.shape[0] - rows
    x, timesteps = x[:host], timesteps[:host]
    context = None if context is None else context[:host]
    y = None if y is None else y[:host]
    cat = stock.namespace.th.cat if hasattr(stock.namespace, "th") else torch.cat

    emb = unet.time_embed(stock.namespace.timestep_embedding(timesteps, unet.model_channels, repeat_only=False))
    if unet.num_classes is not None:
        emb = emb + unet.label_emb(y)
    h = x.type(unet.dtype) if stock.casts_input else x
    forked = False

    def fork() -> None:
        nonlocal h, emb, context, forked
        h, emb = with_row_copies(h, host, rows), with_row_copies(emb, host, rows)
        context = None if context is None else with_row_copies(context, host, rows)
        forked = True

    skips = []
    for index, module in enumerate(unet.input_blocks):
        if at == ("input", index):
            fork()
        h = module(h, emb, context)
        skips.append(h)
    if at[0] == "middle":
        fork()
    h = unet.middle_block(h, emb, context)
    for index, module in enumerate(unet.output_blocks):
        if at == ("output", index):
            fork()
        skip = skips.pop()
        if forked and skip.shape[0] == host:  # made before the fork: copied when consumed, one at a time
            skip = with_row_copies(skip, host, rows)
        h = cat([h, skip], dim=1)
        h = module(h, emb, context)
    return unet.out(h.type(x.dtype))
