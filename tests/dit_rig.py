"""What the DiT tests share: a DitCall built as the host adapters build it, the fork's grown call, and the
runs every family's tests compare (fork against a separate pass, one query against the full blur, a spied
kernel's calls without and with SEG)."""

from __future__ import annotations

import math
from typing import Any

import torch

from seg_lib.core.blocks import resolve_dit
from seg_lib.core.blur import smooth_queries
from seg_lib.families import dit_family
from seg_lib.families.dit import kernel_sites
from seg_lib.families.hooks import DitCall, dit_hooks


def smoothing(sigma: float, seen: list | None = None):
    """The smoothing function of a call; records (ref, grid, query shape) in ``seen``."""

    def smooth(ref, q, grid):
        if seen is not None:
            seen.append((ref, grid, q.shape))
        return smooth_queries(q, grid[0], grid[1], sigma)

    return smooth


def dit_call(model, layers: str, sigma: float, one_query=False, rows=0, fork=None, seen=None) -> DitCall:
    family = dit_family(model)
    refs = resolve_dit(layers, family.layout(model), family.name)
    sites = kernel_sites(family, model)
    assert not isinstance(sites, str), sites
    return DitCall(family, model, refs, sites, smoothing(sigma, seen), one_query, rows, fork, {})


def grow(args: tuple, kwargs: dict[str, Any], cond: slice) -> tuple[tuple, dict[str, Any]]:
    """The host's call with the cond rows appended once more (what the same-call path hands the model)."""

    def grown(value):
        return torch.cat([value, value[cond]]) if isinstance(value, torch.Tensor) else value

    return tuple(map(grown, args)), {key: grown(value) for key, value in kwargs.items()}


def fast_and_separate(model, layers: str, sigma: float, args, kwargs, rows=2, cond=slice(0, 1)):
    """(the host's rows and the copies of one call with the fork, a separate cond pass, the plain output)."""
    one_query = math.isinf(sigma)
    with torch.no_grad():
        plain = model(*args, **kwargs)
        separate_kwargs = {k: v[cond] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        with dit_hooks(dit_call(model, layers, sigma, one_query=one_query)):
            separate = model(*(a[cond] for a in args), **separate_kwargs)
        big_args, big_kwargs = grow(args, kwargs, cond)
        with dit_hooks(dit_call(model, layers, sigma, one_query=one_query, rows=rows, fork=cond)):
            fast = model(*big_args, **big_kwargs)
    return fast, separate, plain


def one_query_and_full_blur(model, layers: str, args, kwargs):
    """The model's output at sigma inf with the one-query shortcut, and with the full blur."""
    with torch.no_grad():
        with dit_hooks(dit_call(model, layers, math.inf, one_query=True)):
            short = model(*args, **kwargs)
        with dit_hooks(dit_call(model, layers, math.inf, one_query=False)):
            full = model(*args, **kwargs)
    return short, full


def kernel_calls_plain_and_seg(model, call: DitCall, seen: list, args, kwargs) -> tuple[list, list]:
    """What a spy on the kernel recorded in ``seen`` over a plain run, then over a run with SEG's hooks."""
    with torch.no_grad():
        model(*args, **kwargs)
        plain = list(seen)
        seen.clear()
        with dit_hooks(call):
            model(*args, **kwargs)
    return plain, list(seen)
