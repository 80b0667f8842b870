"""Reading SEG settings back from parsed infotext: ours, and what the other SEG extensions write
(pamparamm's Forge/ComfyUI extension and v0xie's incantations; see ``imports.py``)."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Mapping
from typing import Any

from seg_lib.core.imports import INCANTATIONS_MARK, PAMPARAMM_MARK, from_incantations, from_pamparamm
from seg_lib.core.params import (
    BY_INFOTEXT,
    HIRES,
    HIRES_OVERRIDES,
    PARAMS,
    RESCALE_PARAMS,
    SCALE,
    SegParams,
    has_seg_infotext,
    params_from_infotext,
)

# Keys written only when not at their default: a paste without them sets their controls to the default.
_OPTIONAL_KEYS = [param.infotext for param in (*RESCALE_PARAMS, HIRES, *HIRES_OVERRIDES)]


def _imported(fields: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """Our keys (and host keys to fill in) from another extension's infotext, when ours are absent."""
    if PAMPARAMM_MARK in fields:
        return from_pamparamm(fields)
    if INCANTATIONS_MARK in fields:
        return from_incantations(fields)
    return {}, {}, []


def _seg_and_host(fields: Mapping[str, Any]) -> tuple[SegParams, dict[str, Any], list[str], bool]:
    ours = {key: fields[key] for key in BY_INFOTEXT if key in fields}
    host: dict[str, Any] = {}
    notes: list[str] = []
    imported = not ours
    if imported:
        ours, host, notes = _imported(fields)
    if not has_seg_infotext(ours):
        return SegParams(), host, notes, imported
    params, warnings = params_from_infotext(ours, strict=False)
    return params, host, notes + warnings, imported


def seg_from_infotext(fields: Mapping[str, Any]) -> tuple[SegParams, list[str]]:
    """SEG settings from parsed infotext, never raising: malformed values keep their default and are
    listed in the returned warnings, with notes on what an import converted. No SEG key at all (ours or
    another extension's) means SEG off."""
    params, _host, notes, _was_imported = _seg_and_host(fields)
    return params, notes


def _readable(key: str, value: Any) -> bool:
    try:
        BY_INFOTEXT[key].check(value)
    except ValueError:
        return False
    return True


def normalize_pasted(fields: dict[str, Any]) -> list[str]:
    """Rewrite parsed infotext in place, before the host pastes it into the SEG controls.

    Afterwards the fields hold only valid SEG keys of ours: other extensions' keys are converted (and the
    host keys they map to filled in where the text lacks them), malformed values are dropped (their
    controls keep their value) with a warning each, settings written only when not default get their
    default when absent, and infotext without SEG gets ``"SEG Scale": "False"``, which turns the enabled
    checkbox (keyed by "SEG Scale") off and which the scale slider ignores as not a number. Returns the
    warnings and notes, for the console.
    """
    params, host, warnings, imported = _seg_and_host(fields)
    ours = [key for key in BY_INFOTEXT if key in fields]
    readable = {key for key in ours if _readable(key, fields[key])}
    for key in BY_INFOTEXT:
        fields.pop(key, None)
    for key, value in host.items():
        fields.setdefault(key, value)
    if not params.enabled:
        fields[SCALE.infotext] = "False"
        return warnings
    every = {param.infotext: param.format(getattr(params, param.name)) for param in PARAMS if param.infotext}
    keep = set(every) if imported else readable | {key for key in _OPTIONAL_KEYS if key not in ours}
    fields.update({key: value for key, value in every.items() if key in keep})
    fields[SCALE.infotext] = every[SCALE.infotext]  # always there: it carries the enabled state
    return warnings


# -- the API's "infotext" field: the host parses it without the paste callback, so imports happen here ----------
_PARAM = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_params_line(line: str) -> dict[str, str]:
    """``key: value, key: "quoted, value"`` pairs of an infotext's last line."""
    fields = {}
    for key, value in _PARAM.findall(line):
        if value.startswith('"') and value.endswith('"') and len(value) > 1:
            with contextlib.suppress(ValueError):  # a malformed quote stays as written
                value = json.loads(value)
        fields[key.strip()] = value.strip() if isinstance(value, str) else value
    return fields


def _quoted(value: str) -> str:
    return json.dumps(value) if any(c in value for c in ',\n:"') else value


def imported_infotext(text: str) -> tuple[str | None, list[str]]:
    """For infotext made by another SEG extension: the same text with our equivalent keys (and the host keys
    they map to) appended, and the notes; ``(None, [])`` when there is nothing to import."""
    lines = text.rstrip().split("\n")
    fields = parse_params_line(lines[-1])
    if any(key in fields for key in BY_INFOTEXT) or not (PAMPARAMM_MARK in fields or INCANTATIONS_MARK in fields):
        return None, []
    normalized = dict(fields)
    notes = normalize_pasted(normalized)
    added = {key: value for key, value in normalized.items() if key not in fields and value != "False"}
    if not added:
        return None, notes
    lines[-1] = ", ".join([lines[-1].rstrip().rstrip(","), *(f"{key}: {_quoted(str(v))}" for key, v in added.items())])
    return "\n".join(lines), notes
