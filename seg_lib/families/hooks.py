"""SEG inside one call of a DiT: the selected blocks' image queries smoothed where the host's attention kernel
gets them, and (same-call path) the smoothed rows forked from the cond rows at the first selected block.

A DiT is a plain stack of blocks with per-row inputs, so this needs no copy of the host's forward: module
hooks on the blocks mark which block runs (the kernel wrapper smooths only there), and for the fork the
model's entry drops the appended copies of the cond rows, the first selected block makes them again from what
the cond rows computed so far, and every later block and output layer gets its per-row inputs (modulation,
position embedding, scratch buffers) extended the same way. Everything in these models is per row, so the
copies' output equals a separate cond pass with the same blocks smoothed. What a family marks as the same
for all rows (``DitFamily.shared_args``) is passed on as it is, and the model methods it names
(``DitFamily.row_methods``: per-row lists made for the host's rows) run on the host's rows and the copies
apart. A model that adds ControlNet residuals for the host's rows between its blocks (a ``control`` input
that is set) is not forked: the call raises before the model runs, and the host's wrapper takes the
separate call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from seg_lib.core.blocks import DitRef
from seg_lib.families.dit import DitFamily, Site

# smooth(ref, queries [B, N, C], grid) -> the smoothed queries, or None (the layer is skipped, said once)
Smooth = Callable[[DitRef, torch.Tensor, "tuple[int, int] | None"], "torch.Tensor | None"]


@dataclass
class DitCall:
    """What one model call with SEG needs."""

    family: DitFamily
    model: nn.Module
    refs: tuple[DitRef, ...]
    sites: tuple[Site, ...]
    smooth: Smooth
    one_query: bool  # sigma = inf: every image query is the mean, so one query per row is attended
    rows: int = 0  # the batch rows from here to the end are smoothed (0: all rows)
    fork: slice | None = None  # same call: the cond rows (of the host's rows) whose copies are the rows above
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class _State:
    grid: tuple[int, int] | None = None
    text_tokens: int = 0
    current: DitRef | None = None
    host: int = 0
    forked: bool = False


def grow(value: Any, host: int, cond: slice) -> Any:
    """``value`` with copies of its ``cond`` rows appended, wherever it holds a tensor with ``host`` rows
    (through lists, tuples, dicts and dataclasses such as Chroma's modulations)."""
    if isinstance(value, torch.Tensor):
        return torch.cat([value, value[cond]]) if value.ndim and value.shape[0] == host else value
    if isinstance(value, list | tuple):
        return type(value)(grow(item, host, cond) for item in value)
    if isinstance(value, dict):
        return {key: grow(item, host, cond) for key, item in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: grow(getattr(value, f.name), host, cond) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    return value


def grow_call(
    function: Any, args: tuple, kwargs: dict, host: int, cond: slice, shared: tuple[str, ...] = ()
) -> tuple[tuple, dict]:
    """A call's arguments with the cond rows' copies appended (``grow``), except the parameters of
    ``function`` named in ``shared``, which hold one value for all rows whatever their length."""
    if not shared:
        return grow(args, host, cond), grow(kwargs, host, cond)
    names = _positional(function)
    args = tuple(
        item if index < len(names) and names[index] in shared else grow(item, host, cond)
        for index, item in enumerate(args)
    )
    return args, {key: item if key in shared else grow(item, host, cond) for key, item in kwargs.items()}


def _positional(function: Any) -> tuple[str, ...]:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return ()
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return tuple(parameter.name for parameter in parameters if parameter.kind in kinds)


def _takes(function: Any, name: str) -> bool:
    try:
        return name in inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False


def _cut(value: Any, total: int, host: int) -> Any:
    if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == total:
        return value[:host]
    return value


@contextlib.contextmanager
def dit_hooks(call: DitCall) -> Iterator[None]:
    """For the duration of one model call: SEG's hooks on ``call.model`` and its kernel wrappers. Everything
    is removed on the way out, also when the call raises (an interrupted generation)."""
    state = _State()
    family, model = call.family, call.model
    selected = set(call.refs)
    first = call.refs[0]
    handles: list[Any] = []

    def entry(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x = args[0] if args else kwargs["x"]
        state.grid = family.grid(x.shape[-2], x.shape[-1], family.patch(model))
        state.text_tokens = family.text_tokens(args, kwargs, model)
        state.current, state.forked = None, False
        if call.fork is None:
            return args, kwargs
        if kwargs.get("control") is not None and _takes(model.forward, "control"):
            # Forge Neo's Flux and Chroma, Forge's SD3.5: the residuals are added between the blocks for the
            # host's rows, where no hook reaches them.
            raise RuntimeError("the model adds ControlNet residuals between its blocks; SEG's rows are not forked")
        total = x.shape[0]
        state.host = total - (call.fork.stop - call.fork.start)
        args = tuple(_cut(value, total, state.host) for value in args)
        kwargs = {key: _cut(value, total, state.host) for key, value in kwargs.items()}
        return args, kwargs

    def exit_(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if call.fork is not None and not state.forked:
            raise RuntimeError(f"SEG's fork block {first} did not run in this call")
        return output

    def before(ref: DitRef | None) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if call.fork is not None and (state.forked or ref == first):
                state.forked = True
                args, kwargs = grow_call(module.forward, args, kwargs, state.host, call.fork, family.shared_args)
            state.current = ref if ref in selected else None
            return args, kwargs

        return hook

    def after(module: nn.Module, args: tuple, output: Any) -> Any:
        state.current = None
        return output

    handles.append(model.register_forward_pre_hook(entry, with_kwargs=True))
    handles.append(model.register_forward_hook(exit_, with_kwargs=True))
    for kind, attr in family.stacks:
        for index, block in enumerate(getattr(model, attr)):
            handles.append(block.register_forward_pre_hook(before(DitRef(kind, index)), with_kwargs=True))
            handles.append(block.register_forward_hook(after))
    for attr in family.after:
        module = getattr(model, attr, None)
        if isinstance(module, nn.Module):
            handles.append(module.register_forward_pre_hook(before(None), with_kwargs=True))
    installed = []
    methods: list[tuple[str, Any]] = []
    try:
        for site in call.sites:
            original = site.namespace[site.name]
            site.namespace[site.name] = _kernel(original, call, state)
            installed.append((site, original))
        if call.fork is not None:
            for name in family.row_methods:
                method = getattr(model, name, None)
                if callable(method) and not isinstance(method, nn.Module):
                    methods.append((name, vars(model).get(name, _UNSET)))
                    setattr(model, name, _apart(method, state))
        yield
    finally:
        for name, previous in reversed(methods):
            if previous is _UNSET:
                delattr(model, name)
            else:
                setattr(model, name, previous)
        for site, original in installed:
            site.namespace[site.name] = original
        for handle in handles:
            handle.remove()


_UNSET = object()


def _apart(method: Callable[..., Any], state: _State) -> Callable[..., Any]:
    """``method`` (rows first, then per-row lists made for the host's rows) on the host's rows and on the
    copies apart, joined: the lists' entries are the same for every row (Forge Neo's ``unpatchify``)."""

    def run(x: Any, *args: Any, **kwargs: Any) -> Any:
        if not state.forked or not isinstance(x, torch.Tensor) or x.shape[0] <= state.host:
            return method(x, *args, **kwargs)
        host, copies = method(x[: state.host], *args, **kwargs), method(x[state.host :], *args, **kwargs)
        if isinstance(host, torch.Tensor):
            return torch.cat([host, copies])
        return type(host)([*host, *copies])  # a list of per-row tensors

    return run


def _kernel(original: Callable[..., torch.Tensor], call: DitCall, state: _State) -> Callable[..., torch.Tensor]:
    """The host's attention kernel, with the current selected block's image queries smoothed in the SEG rows."""

    def kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, *args: Any, **kwargs: Any) -> Any:
        ref, grid, start = state.current, state.grid, call.rows
        if ref is None or start >= q.shape[0]:
            return original(q, k, v, heads, *args, **kwargs)
        axis = 2 if kwargs.get("skip_reshape") else 1  # [B, heads, L, D] or [B, L, heads * D]
        tokens = q.shape[axis]
        images = grid[0] * grid[1] if grid is not None else 0
        first, stop = call.family.image_span(tokens, state.text_tokens, images)
        first, stop = max(first, 0), min(stop, tokens)
        seg_q = q[start:]
        image_q = seg_q.narrow(axis, first, stop - first)
        flat = image_q.transpose(1, 2).flatten(2) if axis == 2 else image_q  # [B, N, C]
        smoothed = call.smooth(ref, flat, grid)
        if smoothed is None:
            return original(q, k, v, heads, *args, **kwargs)
        call.counts["smoothed"] = call.counts.get("smoothed", 0) + 1
        if axis == 2:
            smoothed = smoothed.unflatten(2, (image_q.shape[1], image_q.shape[3])).transpose(1, 2)
        before, after = seg_q.narrow(axis, 0, first), seg_q.narrow(axis, stop, tokens - stop)
        mask = args[0] if args else kwargs.get("mask")
        if call.one_query and mask is None:
            short = torch.cat([before, smoothed.narrow(axis, 0, 1), after], dim=axis)
            out = original(short, k[start:], v[start:], heads, *args, **kwargs)
            if out.ndim == 3 and out.shape[1] == tokens - (stop - first) + 1:  # [B, L, C] as the hosts return it
                out = torch.cat(
                    [out[:, :first], out[:, first : first + 1].expand(-1, stop - first, -1), out[:, first + 1 :]], 1
                )
                if not start:
                    return out
                return torch.cat([original(q[:start], k[:start], v[:start], heads, *args, **kwargs), out])
        seg_q = torch.cat([before, smoothed, after], dim=axis)
        return original(torch.cat([q[:start], seg_q]) if start else seg_q, k, v, heads, *args, **kwargs)

    return kernel
