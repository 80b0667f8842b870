"""SEG's XYZ axes on Forge Classic (``Haoming02/sd-webui-forge-classic`` ``1f95d717``), whose X/Y/Z plot is the
built-in ``extensions-builtin/xyz``: ``scripts/xyz_grid.py`` (loaded as the module ``xyz_grid.py``) has
``axis_options = builtins.builtin_options`` and ``AxisOption`` imported from ``lib_xyz/classes.py``, but no
``boolean_choice`` (it lives in ``lib_xyz/utils.py``); its UI offers an option in a tab when
``type(x) == AxisOption or x.is_img2img == is_img2img``."""

from __future__ import annotations

import sys
from types import ModuleType, SimpleNamespace

from seg_lib.core.params import PARAMS
from seg_lib.xyz import OVERRIDES_ATTRIBUTE, register_axes
from tests.standins import make_p


def format_value_add_label(p, opt, x):
    return f"{opt.label}: {x}"


class AxisOption:
    """``lib_xyz/classes.AxisOption``."""

    def __init__(
        self,
        label,
        type,
        apply,
        format_value=format_value_add_label,
        confirm=None,
        cost=0.0,
        choices=None,
        prepare=None,
    ):
        self.label, self.type, self.apply, self.format_value = label, type, apply, format_value
        self.confirm, self.cost, self.prepare, self.choices = confirm, cost, prepare, choices


class AxisOptionImg2Img(AxisOption):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.is_img2img = True


def classic_xyz(monkeypatch) -> ModuleType:
    """The script module as Forge Classic loads it, found through ``modules.scripts.scripts_data``."""
    lib_classes = ModuleType("lib_xyz.classes")
    lib_classes.AxisOption, lib_classes.AxisOptionImg2Img = AxisOption, AxisOptionImg2Img
    module = ModuleType("xyz_grid.py")
    module.AxisOption = lib_classes.AxisOption
    module.axis_options = [
        AxisOption("Nothing", str, lambda p, x, xs: None),
        AxisOption("Seed", int, lambda p, x, xs: setattr(p, "seed", x)),
        AxisOptionImg2Img("Denoising", float, lambda p, x, xs: setattr(p, "denoising_strength", x)),
    ]
    script = type("XYZ", (), {"__module__": "xyz_grid.py"})
    data = SimpleNamespace(script_class=script, path="extensions-builtin/xyz/scripts/xyz_grid.py", module=module)
    monkeypatch.setitem(sys.modules, "modules", SimpleNamespace(scripts=SimpleNamespace(scripts_data=[data])))
    return module


def offered(axis_options, is_img2img):
    """What Classic's ``XYZ.ui`` puts in a tab's type dropdowns."""
    return [x.label for x in axis_options if type(x) == AxisOption or x.is_img2img == is_img2img]  # noqa: E721


def test_the_seg_axes_on_forge_classic(monkeypatch):
    module = classic_xyz(monkeypatch)
    assert not hasattr(module, "boolean_choice")
    assert register_axes()
    assert register_axes()  # once per process: the second call adds nothing
    labels = [option.label for option in module.axis_options]
    seg = [
        "[SEG] Enabled",
        "[SEG] Scale",
        "[SEG] Blur sigma",
        "[SEG] Layers",
        "[SEG] Start",
        "[SEG] End",
        "[SEG] Rescale",
        "[SEG] Rescale mode",
        "[SEG] Hires fix",
        "[SEG] Hires scale",
        "[SEG] Hires blur sigma",
        "[SEG] Hires layers",
    ]
    assert labels == ["Nothing", "Seed", "Denoising", *seg]
    assert seg == [f"[SEG] {param.label}" for param in PARAMS]
    by_label = {option.label: option for option in module.axis_options}
    assert by_label["[SEG] Enabled"].choices() == ["False", "True"]
    assert by_label["[SEG] Rescale mode"].choices() == ["full", "partial", "snf"]
    assert by_label["[SEG] Scale"].choices is None
    assert all(type(by_label[label]) is AxisOption for label in seg)  # Classic's own class
    for is_img2img in (False, True):  # offered in both tabs
        assert offered(module.axis_options, is_img2img)[-12:] == seg
    cell = make_p()
    by_label["[SEG] Enabled"].apply(cell, "True", None)
    by_label["[SEG] Scale"].apply(cell, 4.0, None)
    assert getattr(cell, OVERRIDES_ATTRIBUTE) == {"enabled": "True", "scale": 4.0}


def test_without_the_xyz_script_nothing_is_registered(monkeypatch):
    other = SimpleNamespace(script_class=type("Other", (), {"__module__": "other.py"}), module=None)
    monkeypatch.setitem(sys.modules, "modules", SimpleNamespace(scripts=SimpleNamespace(scripts_data=[other])))
    assert not register_axes()
