"""XYZ plot axes "[SEG] <label>", one per parameter, in table order, registered once per process."""

from __future__ import annotations

import functools
from typing import Any

from seg_lib.core.params import ENABLED, HIRES, HIRES_OVERRIDES, PARAMS, Param

OVERRIDES_ATTRIBUTE = "seg_xyz"  # per-cell overrides on the (copied) processing object


def axis_label(param: Param) -> str:
    return f"[SEG] {param.label}"


def set_override(p: Any, name: str, value: Any) -> None:
    """Record one axis value on a cell's ``p``; a new dict each time, since XYZ cells share copies of p."""
    setattr(p, OVERRIDES_ATTRIBUTE, {**(getattr(p, OVERRIDES_ATTRIBUTE, None) or {}), name: value})


def overrides(p: Any) -> dict[str, Any]:
    return dict(getattr(p, OVERRIDES_ATTRIBUTE, None) or {})


def _apply(param: Param) -> Any:
    def apply(p: Any, value: Any, _values: Any) -> None:
        set_override(p, param.name, value)
        # An axis over a SEG setting means SEG on in that cell, unless an "[SEG] Enabled" axis said otherwise;
        # likewise an axis over a hires override value means "override" unless "[SEG] Hires fix" said otherwise.
        if param is not ENABLED and ENABLED.name not in overrides(p):
            set_override(p, ENABLED.name, True)
        if param in HIRES_OVERRIDES and HIRES.name not in overrides(p):
            set_override(p, HIRES.name, "override")

    return apply


def _confirm(param: Param) -> Any:
    def confirm(_p: Any, values: list[Any]) -> None:
        for value in values:
            param.check(value)  # ValueError names the parameter; XYZ shows it before any cell runs

    return confirm


def _find_xyz_module() -> Any:
    from modules import scripts

    for data in scripts.scripts_data:
        if data.script_class.__module__ == "xyz_grid.py":
            return data.module
    return None


def register_axes() -> bool:
    """Add the SEG axes to the XYZ script (idempotent). False when the XYZ script is not loaded."""
    xyz = _find_xyz_module()
    if xyz is None:
        return False
    present = {option.label for option in xyz.axis_options}
    for param in PARAMS:
        label = axis_label(param)
        if label in present:
            continue
        # Text for the values XYZ cannot read as numbers ("inf", block lists, True/False, modes).
        kind = float if param.numeric else str
        # Our own lists: Forge Classic's xyz_grid no longer exports the host's boolean_choice helper.
        choices = functools.partial(list, ("False", "True")) if param is ENABLED else None
        if param.choices:
            choices = functools.partial(list, param.choices)
        xyz.axis_options.append(xyz.AxisOption(label, kind, _apply(param), confirm=_confirm(param), choices=choices))
    return True
