"""The forked UNet forward on Forge: SEG's branch computed inside Forge's own UNet call, from the first SEG block on.

Forge's same-call path (``host/forge.py``) appends a copy of the cond chunk's rows to the host's cond/uncond
UNet call. Without a fork those rows run through the whole UNet; with it, for the duration of that one call,
the UNet's forward is ``forked_forward``: it drops the copies on entry, runs the stock forward's body on the
host's rows and, at the first selected block, appends copies of the cond chunk's hidden state, time embedding
and context (each skip made before that point is copied when the decoder consumes it). The blocks are called
the way Forge calls them, with ``transformer_options`` (``block``, ``original_shape``, ``patches``,
``block_modifiers``, ``block_inner_modifiers``), the ``input_block_patch``/``output_block_patch`` hooks (FreeU,
Deep Shrink) and ControlNet's ``control`` residuals; from the fork on, the residuals carry copies of the cond
rows' residuals, so the copies get what the cond rows get. The per-row bookkeeping in ``transformer_options``
(``cond_or_uncond``, ``cond_mark``, ``cond_indices``, ``uncond_indices``, SEG's row marker) describes the host's
rows before the fork and the bigger batch after it.

The body is written from the hosts' source, in three variants (``Variant``): new Forge ``backend/nn/unet.py``
(``IntegratedUNet2DConditionModel.forward``, also ersatzForge's), the 2024 Forge / Forge Classic
``ldm_patched`` ``openaimodel.UNetModel.forward``, and reForge's, which is ComfyUI's ``UNetModel._forward``
behind a wrapper executor (``emb_patch``, no block modifiers, the cast before the output layer). Which one a
running host has is read from its source (``read_forward``); a forward SEG does not know is not forked.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from seg_lib.host.forge_unet_forwards import (  # the stock forwards, named here too for the adapters
    BACKEND,
    COMFY,
    KNOWN_FORWARDS,
    LDM_PATCHED,
    Variant,
    read_forward,
    stock_forwards,
)

__all__ = [
    "BACKEND",
    "CARRIED",
    "COMFY",
    "KNOWN_FORWARDS",
    "LDM_PATCHED",
    "ForkPlan",
    "Variant",
    "forked",
    "forked_forward",
    "plan_fork",
    "read_forward",
    "stock_forwards",
]

# Keys of the UNet call's ``c`` the fork carries to the copies itself (other non-row values stop the fork).
CARRIED = ("control", "control_model")
# Keys of ``c`` the stock forward (or KModel before it) reads; anything else might be read per row elsewhere.
_KNOWN_C = ("c_concat", "c_crossattn", "y", "transformer_options", *CARRIED)
# Per-row bookkeeping in transformer_options: host values before the fork, the bigger batch's after it.
ROW_KEYS = ("cond_or_uncond", "cond_mark", "cond_indices", "uncond_indices", "uuids")


@dataclass(frozen=True)
class ForkPlan:
    """One call's fork: copy the cond rows ``cond`` (of the host's rows) at block ``at`` of ``unet``."""

    unet: nn.Module
    namespace: ModuleType  # the UNet's module: ``timestep_embedding`` and ``apply_control`` as the host has them
    variant: Variant
    at: tuple[str, int]
    cond: slice
    host_rows: dict[str, Any]  # the bookkeeping ROW_KEYS and markers as the host's call has them (None: absent)
    rows: int  # the rows of the UNet call the plan is for: the host's and the copies


def _residual_rows(control: Any, rows: int) -> str | None:
    """Why ``control`` (Forge's dict of per-block residual lists) cannot be given to the copies, or None."""
    if not isinstance(control, Mapping):
        return f"a ControlNet control of type {type(control).__name__}"
    for name, residuals in control.items():
        if not isinstance(residuals, list):
            return f"a ControlNet control entry {name!r} that is not a list"
        for residual in residuals:
            if residual is None:
                continue
            if not isinstance(residual, torch.Tensor) or residual.ndim == 0 or residual.shape[0] not in (1, rows):
                return f"a ControlNet residual of shape {tuple(getattr(residual, 'shape', ()))} for {rows} rows"
    return None


def plan_fork(
    unet: Any,
    stock: Mapping[type, Variant],
    at: tuple[str, int],
    args: dict[str, Any],
    cond: slice,
    markers: tuple[str, ...] = (),
) -> ForkPlan | str:
    """The fork for the wrapper call ``args`` (before its rows are enlarged), or why it cannot fork.
    ``markers``: transformer_options keys that mark rows of the bigger batch (absent before the fork)."""
    variant = stock.get(type(unet))
    if variant is None:
        return f"its UNet class {type(unet).__name__} is not the host's stock one"
    if "forward" in vars(unet) or variant.entry in vars(unet):
        return "another extension wraps the UNet's forward"
    if unet._forward_hooks or unet._forward_pre_hooks:
        return "another extension hooks the UNet's forward"
    if getattr(unet, "predict_codebook_ids", False):
        return "the UNet predicts codebook ids"
    namespace = sys.modules.get(type(unet).__module__)
    if namespace is None:
        return "the UNet's module is not loaded"
    c = args["c"]
    unknown = sorted(key for key in c if key not in _KNOWN_C)
    if unknown:
        return f"the UNet call carries {', '.join(map(repr, unknown))}"
    if c.get("control") is not None and (why := _residual_rows(c["control"], args["input"].shape[0])):
        return f"the UNet call has {why}"
    options = c.get("transformer_options", {})
    host_rows = {key: options.get(key) for key in (*ROW_KEYS, *markers)}
    rows = args["input"].shape[0] + cond.stop - cond.start
    return ForkPlan(unet, namespace, variant, at, cond, host_rows, rows)


@contextlib.contextmanager
def forked(plan: ForkPlan | None) -> Iterator[None]:
    """For the duration of one UNet call, ``plan.unet`` runs the forked forward (nothing when ``plan`` is None)."""
    if plan is None:
        yield
        return

    entry = plan.variant.entry

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if x.shape[0] != plan.rows:  # another wrapper regrouped the batch: the stock forward, all rows
            return getattr(type(plan.unet), entry)(plan.unet, x, *args, **kwargs)
        return forked_forward(plan, x, *args, **kwargs)

    setattr(plan.unet, entry, forward)  # reForge's forward calls _forward through its wrapper executor
    try:
        yield
    finally:
        vars(plan.unet).pop(entry, None)


def _grow(value: torch.Tensor, cond: slice) -> torch.Tensor:
    return torch.cat([value, value[cond]])


def _set_rows(options: dict[str, Any], rows: Mapping[str, Any]) -> None:
    for key, value in rows.items():
        if value is None:
            options.pop(key, None)
        else:
            options[key] = value


def forked_forward(
    plan: ForkPlan,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    context: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    control: Any = None,
    transformer_options: dict[str, Any] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """The host's forward over the host's rows (``x`` minus its last ``len(cond)`` rows, which are copies of the
    cond rows), with those rows' branch forked at ``plan.at``; returns all rows, the copies last."""
    unet, ns, cond = plan.unet, plan.namespace, plan.cond
    options = {} if transformer_options is None else transformer_options
    host = x.shape[0] - (cond.stop - cond.start)
    x, timesteps = x[:host], timesteps[:host]
    context = None if context is None else context[:host]
    y = None if y is None else y[:host]
    # The bigger batch's bookkeeping (and SEG's row marker) wait for the fork; the host's rows come first.
    enlarged_rows = {key: options.get(key) for key in plan.host_rows}
    _set_rows(options, plan.host_rows)
    # apply_control pops each list; popping copies leaves the caller's dict as it was, should the call be redone.
    control = None if control is None else {name: list(residuals) for name, residuals in control.items()}
    variant = plan.variant
    extra = None
    if variant.via_embed:  # ldm_patched's blocks also take the video arguments
        image_only = getattr(unet, "default_image_only_indicator", None) if variant.image_only_default else None
        extra = {
            "time_context": kwargs.get("time_context"),
            "num_video_frames": kwargs.get("num_video_frames", getattr(unet, "default_num_video_frames", None)),
            "image_only_indicator": kwargs.get("image_only_indicator", image_only),
        }

    options["original_shape"] = list(x.shape)
    options["transformer_index"] = 0
    patches = options.get("patches", {})
    block_modifiers = options.get("block_modifiers", []) if variant.block_modifiers else []
    emb = unet.time_embed(ns.timestep_embedding(timesteps, unet.model_channels, repeat_only=False).to(x.dtype))
    for patch in patches.get("emb_patch", []) if variant.emb_patch else []:
        emb = patch(emb, unet.model_channels, options)
    if unet.num_classes is not None:
        emb = emb + unet.label_emb(y)
    h = x
    is_forked = False

    def fork() -> None:
        nonlocal h, emb, context, is_forked
        h, emb = _grow(h, cond), _grow(emb, cond)
        context = None if context is None else _grow(context, cond)
        if control is not None:  # the residuals still to come: the copies get the cond rows' own
            for residuals in control.values():
                residuals[:] = [r if r is None or r.shape[0] != host else _grow(r, cond) for r in residuals]
        _set_rows(options, enlarged_rows)
        options["original_shape"] = [h.shape[0], *x.shape[1:]]  # the UNet input's shape, for the bigger batch
        is_forked = True

    skips = []
    for index, module in enumerate(unet.input_blocks):
        options["block"] = ("input", index)
        if plan.at == ("input", index):
            fork()
        h = _run(module, h, emb, context, options, None, extra, block_modifiers, control, ns, "input")
        for patch in patches.get("input_block_patch", []):
            h = patch(h, options)
        skips.append(h)
        for patch in patches.get("input_block_patch_after_skip", []):
            h = patch(h, options)
    options["block"] = ("middle", 0)
    if plan.at[0] == "middle":
        fork()
    h = _run(unet.middle_block, h, emb, context, options, None, extra, block_modifiers, control, ns, "middle")
    for index, module in enumerate(unet.output_blocks):
        options["block"] = ("output", index)
        if plan.at == ("output", index):
            fork()
        skip = skips.pop()
        if is_forked and skip.shape[0] == host:  # made before the fork: copied when consumed, one at a time
            skip = _grow(skip, cond)
        skip = ns.apply_control(skip, control, "output")
        for patch in patches.get("output_block_patch", []):
            h, skip = patch(h, skip, options)
        h = torch.cat([h, skip], dim=1)
        del skip
        output_shape = skips[-1].shape if skips else None
        h = _run(module, h, emb, context, options, output_shape, extra, block_modifiers, None, ns, "")
    options["block"] = ("last", 0)
    for modifier in block_modifiers:
        h = modifier(h, "before", options)
    if variant.cast_before_out:
        h = h.type(x.dtype)
    if variant.group_norm_wrapper and "group_norm_wrapper" in options:
        h = options["group_norm_wrapper"](unet.out[0], h, options)
        h = unet.out[1:](h)
    else:
        h = unet.out(h)
    for modifier in block_modifiers:
        h = modifier(h, "after", options)
    return h.type(x.dtype)


def _run(
    module: nn.Module,
    h: torch.Tensor,
    emb: torch.Tensor,
    context: torch.Tensor | None,
    options: dict[str, Any],
    output_shape: Any,
    extra: dict[str, Any] | None,
    block_modifiers: list[Any],
    control: Any,
    ns: ModuleType,
    control_name: str,
) -> torch.Tensor:
    """One block as the host runs it: block modifiers before, the block, its control residual, modifiers after."""
    for modifier in block_modifiers:
        h = modifier(h, "before", options)
    if extra is not None:  # ldm_patched runs each block through forward_timestep_embed, not the module's __call__
        h = ns.forward_timestep_embed(module, h, emb, context, options, output_shape, **extra)
    else:
        h = module(h, emb, context, options, output_shape)
    if control_name:
        h = ns.apply_control(h, control, control_name)
    for modifier in block_modifiers:
        h = modifier(h, "after", options)
    return h
