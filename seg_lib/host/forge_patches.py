"""SEG's entries in a Forge-family host's patch vocabulary: ``attn1`` replace patches, the row marker and the
grid in ``transformer_options``, the block inner modifier that sees each layer's grid."""

from __future__ import annotations

import functools
from typing import Any

from seg_lib.host.forge_host import ACTIVATIONS_SHAPE
from seg_lib.host.marks import owned

# transformer_options key: the batch rows SEG's attn1 patches smooth, as ``slice(first, rows)`` (``rows``
# is the batch the marker was written for; None: whatever the batch). Without it the patches smooth nothing.
SMOOTH_ROWS = "seg_smooth_rows"
# transformer_options key: (height, width) of the hidden state entering the current SpatialTransformer,
# written by SEG's block inner modifier just before it runs (the layer's real token grid).
GRID = "seg_grid"
ALL_ROWS = slice(0, None)


def with_attn1(transformer_options: dict[str, Any], patches: dict[tuple[str, int, int], Any]) -> dict[str, Any]:
    """A copy of ``transformer_options`` with ``attn1`` replace patches added. A patch another extension has
    on the same layer (Forge looks up ``(part, index, transformer)``, then ``(part, index)``) is handed to
    ours as ``inner``, so it still runs on every row (SAG records its attention map there)."""
    options = dict(transformer_options)
    replace = dict(options.get("patches_replace", {}))
    attn1 = dict(replace.get("attn1", {}))
    for key, patch in patches.items():
        inner = attn1.get(key, attn1.get(key[:2]))
        attn1[key] = patch if inner is None else functools.partial(patch, inner=inner)
    replace["attn1"] = attn1
    options["patches_replace"] = replace
    return options


def with_attn1_patches(
    model_options: dict[str, Any], patches: dict[tuple[str, int, int], Any], rows: slice | None = ALL_ROWS
) -> dict[str, Any]:
    """A copy of ``model_options`` with ``attn1`` replace patches added and ``rows`` marked for smoothing
    (None: no marker); the original is left alone."""
    options = dict(model_options)
    transformer_options = with_attn1(options.get("transformer_options", {}), patches)
    if rows is not None:
        transformer_options[SMOOTH_ROWS] = rows
    options["transformer_options"] = transformer_options
    return options


def layer_grid(extra_options: dict[str, Any], source: str | None) -> tuple[int, int] | None:
    """The (height, width) a layer's tokens lie on in this call, where the host's convention keeps it."""
    if source == ACTIVATIONS_SHAPE:
        shape = extra_options.get(ACTIVATIONS_SHAPE)
        return tuple(shape[-2:]) if isinstance(shape, (list, tuple)) and len(shape) == 4 else None
    return extra_options.get(GRID)


@owned
def see_grid(x: Any, flag: str, layer: Any, layer_index: int, sequence: Any, transformer_options: dict) -> Any:
    """Block inner modifier: record the spatial shape of the hidden state entering each SpatialTransformer,
    which is the token grid its attention layers see in this call (Deep Shrink, tiles, hires passes)."""
    if flag == "before" and type(layer).__name__ == "SpatialTransformer" and getattr(x, "ndim", 0) == 4:
        transformer_options[GRID] = tuple(x.shape[-2:])
    return x


def add_block_inner_modifier(unet: Any, modifier: Any) -> None:
    add = getattr(unet, "add_block_inner_modifier", None)
    if add is not None:
        add(modifier)
        return
    options = unet.model_options.setdefault("transformer_options", {})  # both families read this list
    options["block_inner_modifiers"] = [*options.get("block_inner_modifiers", []), modifier]


def add_pre_cfg_first(unet: Any, function: Any) -> None:
    """Put ``function`` first among the pre-CFG functions: it then sees the step's latents before another
    one replaces them (ControlNet's inpaint noises the unmasked area there)."""
    options = unet.model_options
    options["sampler_pre_cfg_function"] = [function, *options.get("sampler_pre_cfg_function", [])]


def regrouping_hint(q: Any, k: Any) -> str:
    """What likely merged a layer's tokens, from the attention the patch is given (for the console line).
    The hosts leave ``patches`` out of a patch's extra options, so the ``attn1_patch`` is not to be seen;
    but token merging (tomesd's ``attn1_patch``) merges the queries' tokens and leaves the keys' whole."""
    return "token merging?" if q.shape[1] < k.shape[1] else ""
