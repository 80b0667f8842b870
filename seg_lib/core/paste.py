"""Reading SEG settings back from parsed infotext: ours, and what the Forge/ComfyUI SEG extension writes.

The other extension (pamparamm's sd-perturbed-attention) writes ``seg_enabled``, ``seg_scale``,
``seg_blur_sigma`` (negative = infinite), ``seg_block`` + ``seg_block_id`` (a UNet block by its index, e.g.
``input``/``4``) and ``seg_block_list`` (our selector syntax; it may be empty). Its ``seg_sigma_start`` /
``seg_sigma_end`` are noise levels, not step fractions, so they are reported and not converted.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from seg_lib.core.params import (
    BY_INFOTEXT,
    SCALE,
    SegParams,
    has_seg_infotext,
    params_from_infotext,
    to_infotext,
)


def _legacy_fields(fields: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Our infotext keys, converted from the other extension's keys."""
    converted: dict[str, Any] = {}
    notes: list[str] = []
    if "seg_scale" in fields:
        converted["SEG Scale"] = fields["seg_scale"]
    if "seg_blur_sigma" in fields:
        sigma = fields["seg_blur_sigma"]
        try:
            converted["SEG Sigma"] = "inf" if float(sigma) < 0 else sigma
        except (TypeError, ValueError):
            converted["SEG Sigma"] = sigma  # malformed: reported by the parser
    block_list = str(fields.get("seg_block_list", "") or "").strip()
    if block_list:
        converted["SEG Layers"] = block_list
    elif "seg_block" in fields:
        converted["SEG Layers"] = f"{fields['seg_block']}{fields.get('seg_block_id', 0)}"
    if "seg_sigma_start" in fields or "seg_sigma_end" in fields:
        notes.append("seg_sigma_start/seg_sigma_end are noise levels, not step fractions: not converted")
    return converted, notes


def seg_from_infotext(fields: Mapping[str, Any]) -> tuple[SegParams, list[str]]:
    """SEG settings from parsed infotext, never raising: malformed values keep their default and are
    listed in the returned warnings. No SEG key at all (ours or legacy) means SEG off."""
    ours = {key: fields[key] for key in BY_INFOTEXT if key in fields}
    notes: list[str] = []
    if not ours and "seg_enabled" in fields:
        ours, notes = _legacy_fields(fields)
        if str(fields["seg_enabled"]).strip().lower() == "false":
            return SegParams(), notes
        ours.setdefault("SEG Scale", SegParams.scale)
    if not has_seg_infotext(ours):
        return SegParams(), notes
    params, warnings = params_from_infotext(ours, strict=False)
    return params, notes + warnings


def _readable(key: str, value: Any) -> bool:
    try:
        BY_INFOTEXT[key].check(value)
    except ValueError:
        return False
    return True


def normalize_pasted(fields: dict[str, Any]) -> list[str]:
    """Rewrite parsed infotext in place, before the host pastes it into the SEG controls.

    Afterwards the fields hold only valid SEG keys of ours: legacy keys are converted, malformed values are
    dropped (their controls keep their value) with a warning each, and infotext without SEG gets
    ``"SEG Scale": "False"``, which turns the enabled checkbox (keyed by "SEG Scale") off and which the
    scale slider ignores as not a number. Returns the warnings.
    """
    params, warnings = seg_from_infotext(fields)
    ours = [key for key in BY_INFOTEXT if key in fields]
    readable = {key for key in ours if _readable(key, fields[key])}
    for key in BY_INFOTEXT:
        fields.pop(key, None)
    if not params.enabled:
        fields[SCALE.infotext] = "False"
        return warnings
    valid = to_infotext(params)
    fields.update({key: valid[key] for key in (readable if ours else valid)})
    fields[SCALE.infotext] = valid[SCALE.infotext]  # always there: it carries the enabled state
    return warnings
