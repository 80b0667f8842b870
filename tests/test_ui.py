"""The accordion against a stand-in gradio: one control per table row, in table order, with its infotext key."""

from __future__ import annotations

import sys
from types import ModuleType, SimpleNamespace

from seg_lib import ui
from seg_lib.core.params import PARAMS


class _Component(SimpleNamespace):
    def change(self, **event):
        self.__dict__.setdefault("events", []).append(event)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _factory(kind: str):
    return lambda *args, **kwargs: _Component(kind=kind, args=args, **kwargs)


def test_controls_follow_the_table(monkeypatch):
    gr = ModuleType("gradio")
    for kind in ("Slider", "Dropdown", "Textbox", "Row", "Column", "HTML"):
        setattr(gr, kind, _factory(kind))
    gr.update = lambda **kwargs: kwargs
    components = ModuleType("modules.ui_components")
    components.InputAccordion = lambda value, **kwargs: _Component(kind="InputAccordion", value=value, **kwargs)
    monkeypatch.setitem(sys.modules, "gradio", gr)
    monkeypatch.setitem(sys.modules, "modules", ModuleType("modules"))
    monkeypatch.setitem(sys.modules, "modules.ui_components", components)
    controls = ui.build_controls(lambda name: f"seg_{name}").controls
    assert [c.elem_id for c in controls] == [f"seg_{param.name}" for param in PARAMS]
    for control, param in zip(controls, PARAMS, strict=True):
        shown = control.value
        assert shown == (param.format(param.default) if "sigma" in param.name else param.default)
        if param.choices:
            assert control.choices == list(param.choices)
        if param.numeric:
            assert (control.minimum, control.maximum) == (param.minimum, param.maximum)
    keys = [key for _, key in ui.infotext_fields(controls)]
    assert keys == ["SEG Scale"] + [param.infotext for param in PARAMS[1:]]


def test_every_invalid_setting_is_named_in_the_message():
    defaults = [param.default for param in PARAMS]
    assert ui.problems(defaults) == []
    assert ui.message_html(defaults) == ""
    for name, bad, named in [
        ("blur_sigma", "abc", "blur sigma"),
        ("layers", "q9", "layers"),
        ("scale", -1.0, "scale"),
        ("hires_blur_sigma", "0", "hires blur sigma"),
    ]:
        values = list(defaults)
        values[[param.name for param in PARAMS].index(name)] = bad
        found = ui.problems(values)
        assert len(found) == 1
        assert named in found[0].lower()
        assert named in ui.message_html(values).lower()
    values = list(defaults)
    values[4], values[5] = 0.8, 0.2  # start after end
    assert "start" in ui.problems(values)[0]


def test_controls_shown_only_when_they_matter():
    assert not ui.rescale_mode_shown(0.0)
    assert ui.rescale_mode_shown(0.3)
    assert ui.hires_shown(False, "override") == (False, False)
    assert ui.hires_shown(True, "same") == (True, False)
    assert ui.hires_shown(True, "override") == (True, True)


def test_hires_link_wires_once_whatever_comes_first(monkeypatch):
    gr = ModuleType("gradio")
    gr.update = lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "gradio", gr)
    for checkbox_first in (True, False):
        controls = [_Component(elem_id=f"c{i}") for i in range(len(PARAMS))]
        accordion = ui.Accordion(controls=controls, hires_row=_Component(), message=_Component())
        checkbox = _Component(elem_id=ui.HIRES_FIX_CHECKBOX)
        link = ui.HiresLink()
        if checkbox_first:
            link.saw(_Component(elem_id="txt2img_hr"))  # the accordion half: not the checkbox
            link.saw(checkbox)
            link.built(accordion)
        else:
            link.built(accordion)
            link.saw(checkbox)
        link.saw(checkbox)
        assert len(checkbox.events) == 1
        hires = controls[[param.name for param in PARAMS].index("hires")]
        assert len(hires.events) == 1
