"""The SEG accordion, built from the parameter table (A1111's gradio 3 and Forge's gradio 4 alike).

Controls come back in table order, which is the positional order of the API's ``args``. Their infotext
keys (PNG Info, "Send to", the API's ``infotext``) come from the same table.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from typing import Any

from seg_lib import names
from seg_lib.core.params import (
    BLUR_SIGMA,
    BY_INFOTEXT,
    ENABLED,
    END,
    HIRES,
    HIRES_BLUR_SIGMA,
    HIRES_LAYERS,
    HIRES_SCALE,
    LAYERS,
    PARAMS,
    RESCALE,
    RESCALE_MODE,
    SCALE,
    START,
    Param,
)

TITLE = names.TITLE  # the accordion's label, whatever title() answers (see names.py)
SIGMA_CHOICES = ["inf", "1", "2", "4", "10", "16", "100"]
CSS_CLASS = "seg-control"


def _slider(gr: Any, param: Param, elem_id: str, step: float) -> Any:
    return gr.Slider(
        minimum=param.minimum,
        maximum=param.maximum,
        step=step,
        value=param.default,
        label=param.label,
        elem_id=elem_id,
        elem_classes=[CSS_CLASS],
    )


def _sigma(gr: Any, param: Param, elem_id: str) -> Any:
    return gr.Dropdown(
        choices=SIGMA_CHOICES,
        value=param.format(param.default),
        allow_custom_value=True,
        label=f"{param.label} (inf = mean query)",
        elem_id=elem_id,
        elem_classes=[CSS_CLASS],
    )


def _layers(gr: Any, param: Param, elem_id: str) -> Any:
    return gr.Textbox(
        value=param.default,
        label=param.label,
        placeholder="m0, d0-d3, u0.4",
        max_lines=1,
        elem_id=elem_id,
        elem_classes=[CSS_CLASS],
    )


def _choice(gr: Any, param: Param, elem_id: str) -> Any:
    return gr.Dropdown(
        choices=list(param.choices or ()),
        value=param.default,
        label=param.label,
        elem_id=elem_id,
        elem_classes=[CSS_CLASS],
    )


def build_controls(elem_id: Callable[[str], str]) -> list[Any]:
    """Create the accordion and its controls inside the current gradio context, in table order."""
    import gradio as gr
    from modules.ui_components import InputAccordion

    with InputAccordion(ENABLED.default, label=TITLE, elem_id=elem_id(ENABLED.name)) as enabled:
        with gr.Row():
            scale = _slider(gr, SCALE, elem_id(SCALE.name), 0.1)
            blur_sigma = _sigma(gr, BLUR_SIGMA, elem_id(BLUR_SIGMA.name))
        with gr.Row():
            layers = _layers(gr, LAYERS, elem_id(LAYERS.name))
            start = _slider(gr, START, elem_id(START.name), 0.01)
            end = _slider(gr, END, elem_id(END.name), 0.01)
        with gr.Row():
            rescale = _slider(gr, RESCALE, elem_id(RESCALE.name), 0.01)
            rescale_mode = _choice(gr, RESCALE_MODE, elem_id(RESCALE_MODE.name))
        with gr.Row():  # the hires CFG scale is the WebUI's own field (Forge), not repeated here
            hires = _choice(gr, HIRES, elem_id(HIRES.name))
            hires_scale = _slider(gr, HIRES_SCALE, elem_id(HIRES_SCALE.name), 0.1)
            hires_blur_sigma = _sigma(gr, HIRES_BLUR_SIGMA, elem_id(HIRES_BLUR_SIGMA.name))
            hires_layers = _layers(gr, HIRES_LAYERS, elem_id(HIRES_LAYERS.name))
        # Tooltips for javascript/seg_tooltips.js, from the table (one source of truth).
        tips = {elem_id(param.name): param.help for param in PARAMS}
        gr.HTML(
            f'<div class="seg-tooltips" hidden data-tips="{html.escape(json.dumps(tips))}"></div>',
            visible=False,
            elem_classes=["seg-tooltip-data"],
        )
    controls = [enabled, scale, blur_sigma, layers, start, end, rescale, rescale_mode]
    controls += [hires, hires_scale, hires_blur_sigma, hires_layers]
    assert len(controls) == len(PARAMS)
    return controls


def infotext_fields(controls: list[Any]) -> list[tuple[Any, str]]:
    """(control, infotext key) pairs. Plain string keys, so "Send to img2img" can copy the controls too.

    The enabled checkbox is keyed by "SEG Scale", which every SEG infotext has: present -> on. Pasting text
    without SEG turns it off through ``normalize_pasted`` (run by the host before the fields are applied).
    """
    keys = [SCALE.infotext] + [param.infotext for param in PARAMS[1:]]
    return list(zip(controls, keys, strict=True))


# Infotext keys whose controls "Send to txt2img/img2img" copies.
PASTE_FIELD_NAMES = list(BY_INFOTEXT)
