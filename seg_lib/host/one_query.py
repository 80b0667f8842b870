"""Sigma = inf: one query per image. Infinite blur replaces every query of a layer by their mean, so each
smoothed row's attention output is one vector for all its tokens. Computing it for one query and broadcasting
it over the tokens is exact, and takes the layer's attention from N x N to 1 x N per head (the large cost of
``d0`` and last-decoder selections: a 64x64 grid at 512).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


def one_query_attention(
    attention: Callable[..., torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    rows: slice,
    mean_query: torch.Tensor,
) -> torch.Tensor:
    """Forge's attn1 replace patch at sigma = inf: the rows before ``rows.start`` attend as they are; the
    ``rows`` (to the end of the batch) attend with their one ``mean_query`` (``[r, 1, C]``), broadcast."""
    smoothed = attention(mean_query, k[rows], v[rows], heads).expand(-1, q.shape[1], -1)
    if not rows.start:
        return smoothed
    return torch.cat([attention(q[: rows.start], k[: rows.start], v[: rows.start], heads), smoothed])


@contextlib.contextmanager
def one_query_attn1(modules: list[nn.Module], rows: slice | None, state: dict[str, bool]) -> Iterator[None]:
    """A1111 at sigma = inf, for one UNet call: each self-attention module runs the other rows as they are and
    the ``rows`` (all when None) with ``state["one"]`` set, while its ``to_q`` hook returns one mean query per
    row; the one output token is broadcast over the tokens. The host's own attention code runs every part
    (hypernetworks, upcasting and the chosen kernel included)."""
    saved = []
    for module in modules:
        saved.append((module, vars(module).get("forward")))
        module.forward = _split_forward(module.forward, rows, state)
    try:
        yield
    finally:
        for module, previous in saved:
            if previous is None:
                vars(module).pop("forward", None)
            else:
                module.forward = previous


def _split_forward(plain: Callable[..., torch.Tensor], rows: slice | None, state: dict[str, bool]) -> Callable:
    def forward(x: torch.Tensor, context: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        if context is not None or args:  # cross-attending: not SEG's self-attention, leave it alone
            return plain(x, context, *args, **kwargs)
        start, stop, _ = (rows or slice(None)).indices(x.shape[0])
        state["one"] = True
        try:
            out = plain(x[start:stop], **kwargs)
        finally:
            state["one"] = False
        parts = [out.expand(-1, x.shape[1], -1) if out.shape[1] == 1 else out]
        if start:
            parts.insert(0, plain(x[:start], **kwargs))
        if stop < x.shape[0]:
            parts.append(plain(x[stop:], **kwargs))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    return forward
