"""The accordion against a stand-in gradio: one control per table row, in table order, with its infotext key."""

from __future__ import annotations

import sys
from types import ModuleType, SimpleNamespace

from seg_lib import ui
from seg_lib.core.params import PARAMS


class _Component(SimpleNamespace):
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _factory(kind: str):
    return lambda *args, **kwargs: _Component(kind=kind, args=args, **kwargs)


def test_controls_follow_the_table(monkeypatch):
    gr = ModuleType("gradio")
    for kind in ("Slider", "Dropdown", "Textbox", "Row", "HTML"):
        setattr(gr, kind, _factory(kind))
    components = ModuleType("modules.ui_components")
    components.InputAccordion = lambda value, **kwargs: _Component(kind="InputAccordion", value=value, **kwargs)
    monkeypatch.setitem(sys.modules, "gradio", gr)
    monkeypatch.setitem(sys.modules, "modules", ModuleType("modules"))
    monkeypatch.setitem(sys.modules, "modules.ui_components", components)
    controls = ui.build_controls(lambda name: f"seg_{name}")
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
