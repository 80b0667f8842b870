"""The SEG accordion, built from the parameter table (A1111's gradio 3 and Forge's gradio 4 alike).

Controls come back in table order, which is the positional order of the API's ``args``. Their infotext
keys (PNG Info, "Send to", the API's ``infotext``) come from the same table.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from typing import Any

from seg_lib.core.params import BLUR_SIGMA, BY_INFOTEXT, ENABLED, END, LAYERS, PARAMS, SCALE, START, Param

TITLE = "Smoothed Energy Guidance"
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


def build_controls(elem_id: Callable[[str], str]) -> list[Any]:
    """Create the accordion and its controls inside the current gradio context, in table order."""
    import gradio as gr
    from modules.ui_components import InputAccordion

    with InputAccordion(ENABLED.default, label=TITLE, elem_id=elem_id(ENABLED.name)) as enabled:
        with gr.Row():
            scale = _slider(gr, SCALE, elem_id(SCALE.name), 0.1)
            blur_sigma = gr.Dropdown(
                choices=SIGMA_CHOICES,
                value=BLUR_SIGMA.format(BLUR_SIGMA.default),
                allow_custom_value=True,
                label=f"{BLUR_SIGMA.label} (inf = mean query)",
                elem_id=elem_id(BLUR_SIGMA.name),
                elem_classes=[CSS_CLASS],
            )
        with gr.Row():
            layers = gr.Textbox(
                value=LAYERS.default,
                label=LAYERS.label,
                placeholder="m0, d0-d3, u0.4",
                max_lines=1,
                elem_id=elem_id(LAYERS.name),
                elem_classes=[CSS_CLASS],
            )
            start = _slider(gr, START, elem_id(START.name), 0.01)
            end = _slider(gr, END, elem_id(END.name), 0.01)
        # Tooltips for javascript/seg_tooltips.js, from the table (one source of truth).
        tips = {elem_id(param.name): param.help for param in PARAMS}
        gr.HTML(
            f'<div class="seg-tooltips" hidden data-tips="{html.escape(json.dumps(tips))}"></div>',
            visible=False,
            elem_classes=["seg-tooltip-data"],
        )
    controls = [enabled, scale, blur_sigma, layers, start, end]
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
