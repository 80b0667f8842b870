"""The SEG accordion, built from the parameter table (A1111's gradio 3 and Forge's gradio 4 alike).

Controls come back in table order, which is the positional order of the API's ``args``. Their infotext
keys (PNG Info, "Send to", the API's ``infotext``) come from the same table.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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
    HIRES_OVERRIDES,
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


def _slider(gr: Any, param: Param, elem_id: str, step: float, visible: bool = True) -> Any:
    return gr.Slider(
        visible=visible,
        minimum=param.minimum,
        maximum=param.maximum,
        step=step,
        value=param.default,
        label=param.label,
        elem_id=elem_id,
        elem_classes=[CSS_CLASS],
    )


def _sigma(gr: Any, param: Param, elem_id: str, visible: bool = True) -> Any:
    return gr.Dropdown(
        visible=visible,
        choices=SIGMA_CHOICES,
        value=param.format(param.default),
        allow_custom_value=True,
        label=f"{param.label} (inf = full blur)",
        elem_id=elem_id,
        elem_classes=[CSS_CLASS],
    )


def _layers(gr: Any, param: Param, elem_id: str, visible: bool = True) -> Any:
    return gr.Textbox(
        visible=visible,
        value=param.default,
        label=param.label,
        placeholder="m0, d0-d3, u0.4",
        max_lines=1,
        elem_id=elem_id,
        elem_classes=[CSS_CLASS],
    )


def _choice(gr: Any, param: Param, elem_id: str, visible: bool = True) -> Any:
    return gr.Dropdown(
        visible=visible,
        choices=list(param.choices or ()),
        value=param.default,
        label=param.label,
        elem_id=elem_id,
        elem_classes=[CSS_CLASS],
    )


def problems(values: Sequence[Any]) -> list[str]:
    """What is wrong with the controls' values (table order), one message per setting, each naming it."""
    found = []
    checked: dict[str, Any] = {}
    for param, value in zip(PARAMS, values, strict=False):
        try:
            checked[param.name] = param.check(value)
        except ValueError as error:
            found.append(str(error))
    if not found and checked.get(START.name, 0.0) > checked.get(END.name, 1.0):
        found.append(f"SEG start ({START.name}) must not be after SEG end ({END.name})")
    return found


def message_html(values: Sequence[Any]) -> str:
    """The accordion's warning: empty when every value is valid. The generation then runs without SEG (it
    cannot stop the host's run) and says so under the image too, so the person is told twice."""
    found = problems(values)
    if not found:
        return ""
    items = "".join(f"<li>{html.escape(text)}</li>" for text in found)
    return (
        '<div class="seg-warning" role="alert"><strong>SEG will be off for the next image</strong> until this is '
        f"fixed:<ul>{items}</ul></div>"
    )


def rescale_mode_shown(rescale: Any) -> bool:
    """The mode only matters once some rescale is asked for."""
    try:
        return float(rescale) > 0
    except (TypeError, ValueError):
        return True  # an unreadable value: show everything, the warning says what is wrong


def hires_shown(hires_fix_on: Any, mode: Any) -> tuple[bool, bool]:
    """(the hires row, its override values): the row only with the tab's Hires fix on, the values only with
    the mode set to override."""
    on = bool(hires_fix_on)
    return on, on and str(mode).strip().lower() == "override"


@dataclass
class Accordion:
    """The built controls (table order) and the groups whose visibility follows other controls."""

    controls: list[Any]
    hires_row: Any
    message: Any


def build_controls(elem_id: Callable[[str], str]) -> Accordion:
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
            rescale_mode = _choice(gr, RESCALE_MODE, elem_id(RESCALE_MODE.name), visible=False)
        # Shown only with the tab's own Hires fix on (see HiresLink); the hires CFG scale is the WebUI's own.
        with gr.Column(visible=False, elem_id=elem_id("hires_row")) as hires_row:
            with gr.Row():  # two per row: four in one wrap unevenly in a narrow column
                hires = _choice(gr, HIRES, elem_id(HIRES.name))
                hires_scale = _slider(gr, HIRES_SCALE, elem_id(HIRES_SCALE.name), 0.1, visible=False)
            with gr.Row():
                hires_blur_sigma = _sigma(gr, HIRES_BLUR_SIGMA, elem_id(HIRES_BLUR_SIGMA.name), visible=False)
                hires_layers = _layers(gr, HIRES_LAYERS, elem_id(HIRES_LAYERS.name), visible=False)
        message = gr.HTML("", visible=False, elem_id=elem_id("message"), elem_classes=["seg-message"])
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

    def warn(*values: Any) -> Any:
        text = message_html(values)
        return gr.update(value=text, visible=bool(text))

    for control in controls[1:]:
        control.change(fn=warn, inputs=controls, outputs=[message], queue=False, show_progress=False)
    rescale.change(
        fn=lambda value: gr.update(visible=rescale_mode_shown(value)),
        inputs=[rescale],
        outputs=[rescale_mode],
        queue=False,
        show_progress=False,
    )
    return Accordion(controls=controls, hires_row=hires_row, message=message)


# The host's Hires fix: an InputAccordion, whose checkbox half carries this id (A1111 and the Forges alike).
HIRES_FIX_CHECKBOX = "txt2img_hr-checkbox"


class HiresLink:
    """Shows the SEG hires controls while the tab's Hires fix is on. The host builds its Hires fix before the
    scripts' accordions, but either order works: the events are wired once both sides exist. One per tab
    (the Script instance's); UI wiring only, nothing about a generation."""

    def __init__(self) -> None:
        self.checkbox: Any = None
        self.accordion: Accordion | None = None
        self.wired = False

    def saw(self, component: Any) -> None:
        if self.checkbox is None and getattr(component, "elem_id", None) == HIRES_FIX_CHECKBOX:
            self.checkbox = component
            self._wire()

    def built(self, accordion: Accordion) -> None:
        self.accordion = accordion
        self._wire()

    def _wire(self) -> None:
        if self.wired or self.checkbox is None or self.accordion is None:
            return
        import gradio as gr

        self.wired = True
        hires = self.accordion.controls[PARAMS.index(HIRES)]
        overrides = [self.accordion.controls[PARAMS.index(param)] for param in HIRES_OVERRIDES]

        def show(hires_fix_on: Any, mode: Any) -> list[Any]:
            row, values = hires_shown(hires_fix_on, mode)
            return [gr.update(visible=row)] + [gr.update(visible=values)] * len(overrides)

        for trigger in (self.checkbox, hires):
            trigger.change(
                fn=show,
                inputs=[self.checkbox, hires],
                outputs=[self.accordion.hires_row, *overrides],
                queue=False,
                show_progress=False,
            )


def infotext_fields(controls: list[Any]) -> list[tuple[Any, str]]:
    """(control, infotext key) pairs. Plain string keys, so "Send to img2img" can copy the controls too.

    The enabled checkbox is keyed by "SEG Scale", which every SEG infotext has: present -> on. Pasting text
    without SEG turns it off through ``normalize_pasted`` (run by the host before the fields are applied).
    """
    keys = [SCALE.infotext] + [param.infotext for param in PARAMS[1:]]
    return list(zip(controls, keys, strict=True))


# Infotext keys whose controls "Send to txt2img/img2img" copies.
PASTE_FIELD_NAMES = list(BY_INFOTEXT)
