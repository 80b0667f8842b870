"""What other extensions installed on a Forge UNet patcher, and whether SEG may add rows to the host's call.

The same-call path appends the smoothed branch's rows to the host's own cond/uncond UNet call. That is only
safe when everything else in that call treats each row on its own and keeps no state from one call to the
next. Forge's Reference (``attn1`` replace patches that record keys/values in one call and read them in the
next, plus a conditioning modifier that runs a nested sampling call), StyleAlign (attention shared across the
batch), IP-Adapter (``attn2`` replace patches) and MultiDiffusion (a UNet function wrapper that regroups
rows into tiles) do not qualify; ControlNet's residuals are handled by the fork (``forge_fork``), which
gives the copies the cond rows' residuals, and otherwise keep the step on the separate call. SEG decides
this *before* the call, from the model options the step runs with, so that a failed attempt can never
leave another extension's state half-written; a step that does not qualify uses the separate call, which
every one of them handles as the host's own calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from seg_lib.host.marks import is_owned

# transformer_options["patches"] kinds that act on each row's hidden state alone (FreeU's skip scaling,
# Kohya HRFix / Deep Shrink's resizing) and keep no state between calls.
ROW_WISE_PATCHES = frozenset({"input_block_patch", "input_block_patch_after_skip", "output_block_patch"})

# Keys the host itself writes into transformer_options per call: bookkeeping, not extensions.
HOST_KEYS = frozenset(
    {
        "original_shape",
        "transformer_index",
        "block",
        "block_index",
        "cond_or_uncond",
        "sigmas",
        "cond_mark",
        "cond_indices",
        "uncond_indices",
        "n_heads",
        "dim_head",
        "patches",
        "patches_replace",
        "block_modifiers",
        "block_inner_modifiers",
        "uuids",  # reForge: one id per chunk of the call
        "activations_shape",  # reForge: the input shape of the SpatialTransformer running
        "attn_precision",  # reForge: the attention's precision, per layer
        "sampling_sigmas",  # Forge Neo: the sampler's whole schedule, written before sampling
        "wrappers",  # reForge's wrapper and callback registries: checked below, entry by entry
        "callbacks",
    }
)


def _row_wise_replace(function: object) -> bool:
    """Replace patches known to be row-wise: Forge's (and reForge's) SAG records the uncond chunk's middle-block
    attention by ``cond_or_uncond``, which the same-call path extends, and computes its own pass after CFG."""
    name = getattr(function, "__qualname__", "") or ""
    return _module(function) in ("forge_sag", "nodes_sag") and name.endswith("attn_and_record")  # Forge, reForge


def _module(function: object) -> str:
    """The last part of a function's module name; the WebUIs load script files as modules named after the
    file (``forge_reference.py``)."""
    return (getattr(function, "__module__", "") or "?").removesuffix(".py").rsplit(".", 1)[-1]


def _name(function: object) -> str:
    return f"{_module(function)}.{getattr(function, '__name__', type(function).__name__)}"


def _foreign(functions: Iterable[object]) -> list[object]:
    return [function for function in functions if not is_owned(function)]


def same_call_blockers(model_options: Mapping[str, Any], own_keys: Iterable[str] = ()) -> list[str]:
    """Why the host's call may not carry SEG's rows under these model options (empty: it may).
    ``own_keys``: transformer_options keys SEG itself writes."""
    reasons: list[str] = []
    known = HOST_KEYS | set(own_keys)
    to = model_options.get("transformer_options", {}) or {}
    for kind, patches in sorted((to.get("patches") or {}).items()):
        if kind not in ROW_WISE_PATCHES and _foreign(patches):
            reasons.append(f"another extension's {kind} ({_name(_foreign(patches)[0])})")
    for kind, replace in sorted((to.get("patches_replace") or {}).items()):
        others = [f for f in _foreign(replace.values()) if not (kind == "attn1" and _row_wise_replace(f))]
        if others:
            reasons.append(f"another extension replaces {kind} ({_name(others[0])}; Reference, IP-Adapter?)")
    for key in ("block_modifiers", "block_inner_modifiers"):
        if others := _foreign(to.get(key) or []):
            reasons.append(f"another extension's {key} ({_name(others[0])})")
    if others := _foreign(model_options.get("conditioning_modifiers") or []):
        reasons.append(f"another extension's conditioning modifier ({_name(others[0])}; Reference?)")
    unknown = sorted(key for key in to if key not in known and not is_owned(to[key]))
    if unknown:
        reasons.append(f"transformer options SEG does not know: {', '.join(map(str, unknown))}")
    for registry in ("wrappers", "callbacks"):  # reForge: {kind: {key: [functions]}}
        for kind, entries in sorted((to.get(registry) or {}).items()):
            functions = [f for group in (entries or {}).values() for f in (group or [])]
            if others := _foreign(functions):
                reasons.append(f"another extension's {kind} {registry[:-1]} ({_name(others[0])})")
    wrapper = model_options.get("model_function_wrapper")
    while is_owned(wrapper):  # SEG's wrapper chains the one that was there before it
        wrapper = getattr(wrapper, "seg_previous", lambda: None)()
    if wrapper is not None:
        reasons.append(f"another UNet function wrapper ({_name(wrapper)}; MultiDiffusion?)")
    return reasons
