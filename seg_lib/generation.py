"""Per-generation settings, shared by every host: UI/API arguments plus XYZ overrides -> SegParams."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from seg_lib.core.params import BY_INFOTEXT, PARAMS, SegParams, params_from_args
from seg_lib.log import log
from seg_lib.xyz import overrides


def script_args_to_params(args: Sequence[Any]) -> SegParams:
    """The script's argument slice: positional values in table order, or (API object form) a mapping
    first, the host having filled the remaining slots with UI defaults."""
    if args and isinstance(args[0], Mapping):
        return params_from_args(args[0])
    return params_from_args(list(args))


def params_for_generation(p: Any, args: Sequence[Any]) -> SegParams:
    """Settings for this generation (XYZ cell values win). Invalid settings switch SEG off for it, with one line.

    SEG keys are removed from the infotext: XYZ cells share one ``extra_generation_params`` dict, and a cell
    with SEG off must carry no SEG keys. They are written back once a step is guided (``Run.note_guided``),
    so that an image claims SEG only where SEG ran.
    """
    for key in BY_INFOTEXT:
        p.extra_generation_params.pop(key, None)
    try:
        params = script_args_to_params(args)
        cell = overrides(p)
        if cell:
            named = {param.name: value for param, value in zip(PARAMS, params.values(), strict=True)}
            params = params_from_args({**named, **cell})
    except ValueError as error:
        log(f"SEG is off for this generation: {error}")
        if _asked_for(args):
            _tell_the_person(p, f"SEG was off for this image: {error}")
        return SegParams()
    return params


def _asked_for(args: Sequence[Any]) -> bool:
    """Whether the arguments turn SEG on (a bad value in settings that were off anyway is no news)."""
    if not args:
        return False
    first = args[0]
    if isinstance(first, Mapping):
        first = first.get("enabled", False)
    if isinstance(first, str):
        return first.strip().lower() in {"true", "1", "yes", "on"}
    return first is True or first == 1


def _tell_the_person(p: Any, text: str) -> None:
    """A comment under the image in the UI (the hosts' ``p.comment``), besides the console line."""
    comment = getattr(p, "comment", None)
    if callable(comment):
        comment(text)
