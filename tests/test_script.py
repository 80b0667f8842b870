"""The AlwaysVisible script, loaded the way the WebUI loads it, against stand-in ``modules``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from seg_lib.core.params import SegParams
from seg_lib.host.run import RUN_ATTRIBUTE, on_cfg_denoiser
from seg_lib.names import ALIAS, TITLE
from tests.standins import make_p

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "seg.py"


@pytest.fixture
def loaded(monkeypatch):
    registered: dict[str, list] = {}

    def register(kind):
        # Positional only, like the 1.8-era hosts (A1111 1.10 also takes name=).
        return lambda callback: registered.setdefault(kind, []).append(callback)

    callbacks = ModuleType("modules.script_callbacks")
    for kind in ("on_cfg_denoiser", "on_infotext_pasted", "on_before_ui", "on_app_started"):
        setattr(callbacks, kind, register(kind))
    scripts = ModuleType("modules.scripts")
    scripts.Script = type("Script", (), {})
    scripts.AlwaysVisible = object()
    shared = ModuleType("modules.shared")
    shared.OptionInfo = lambda default, label, section: SimpleNamespace(default=default, label=label, section=section)
    shared.opts = SimpleNamespace(data_labels={}, data={})
    shared.opts.add_option = lambda key, info: (
        shared.opts.data_labels.__setitem__(key, info),
        shared.opts.data.setdefault(key, info.default),
    )
    modules = ModuleType("modules")
    modules.script_callbacks, modules.scripts, modules.shared = callbacks, scripts, shared
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.shared", shared)
    monkeypatch.setitem(sys.modules, "modules.script_callbacks", callbacks)
    monkeypatch.setitem(sys.modules, "modules.scripts", scripts)
    monkeypatch.setattr("seg_lib.host.HOST", "a1111")
    spec = importlib.util.spec_from_file_location("seg.py", SCRIPT)  # as the WebUI's script loader does
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, registered, scripts


def test_the_fast_path_setting_is_registered_at_load(loaded):
    """Registered at import: an API-only WebUI never builds the settings page, yet takes override_settings."""
    shared = sys.modules["modules.shared"]
    info = shared.opts.data_labels["seg_fast_path"]
    assert info.default is True
    assert info.section == ("seg", "Smoothed Energy Guidance")
    assert shared.opts.data["seg_fast_path"] is True


def test_callbacks_registered_once_at_load(loaded):
    _, registered, _ = loaded
    assert registered["on_cfg_denoiser"] == [on_cfg_denoiser]
    assert set(registered) == {"on_cfg_denoiser", "on_infotext_pasted", "on_before_ui", "on_app_started"}
    assert all(len(found) == 1 for found in registered.values())


def test_script_is_always_visible_and_keeps_no_state(loaded):
    module, _, scripts = loaded
    script = module.SmoothedEnergyGuidanceScript()
    assert script.title() == "Smoothed Energy Guidance"
    assert script.show(False) is scripts.AlwaysVisible
    assert script.show(True) is scripts.AlwaysVisible
    before = dict(vars(script))
    p = make_p()
    script.process(p, True, 2.0, "4", "m0", 0.0, 1.0)
    assert getattr(p, RUN_ATTRIBUTE).params == SegParams(True, 2.0, 4.0, "m0", 0.0, 1.0)
    script.process_batch(p, True, 2.0, "4", "m0", 0.0, 1.0, batch_number=0)
    assert "SEG Scale" not in p.extra_generation_params  # claimed once a step is guided
    getattr(p, RUN_ATTRIBUTE).note_guided()
    assert p.extra_generation_params["SEG Scale"] == "2.0"
    script.process_before_every_sampling(p, True, 2.0, "4", "m0", 0.0, 1.0)
    script.postprocess_batch(p, True, 2.0, "4", "m0", 0.0, 1.0, batch_number=0)
    script.postprocess(p, SimpleNamespace(), True, 2.0, "4", "m0", 0.0, 1.0)
    assert getattr(p, RUN_ATTRIBUTE) is None
    assert vars(script) == before  # nothing about the generation stayed on the Script


def test_pasted_infotext_is_normalized(loaded):
    _, registered, _ = loaded
    fields = {"Steps": "20"}
    registered["on_infotext_pasted"][0]("text", fields)
    assert fields["SEG Scale"] == "False"


def _script_data(cls, path):
    return SimpleNamespace(script_class=cls, path=path, basedir="", module=None)


class _OtherSeg:  # another extension's script with our title (pamparamm's / incantations')
    def title(self):
        return "Smoothed Energy Guidance"


class _Stateful:  # a title() that needs __init__ state: skipped, not fatal
    def title(self):
        return self.name


@pytest.mark.parametrize(("ours_first", "expected"), [(True, TITLE), (False, ALIAS)])
def test_title_and_startup_line_with_another_script_of_the_same_title(loaded, capsys, ours_first, expected):
    module, registered, scripts = loaded
    ours = _script_data(module.SmoothedEnergyGuidanceScript, "extensions/sd-webui-seg/scripts/seg.py")
    other = _script_data(_OtherSeg, "extensions/sd-perturbed-attention/scripts/seg.py")
    scripts.scripts_data = [_script_data(_Stateful, "x.py"), *([ours, other] if ours_first else [other, ours])]
    assert module.SmoothedEnergyGuidanceScript().title() == expected
    app = SimpleNamespace(middleware=[])
    app.add_middleware = lambda cls, **kwargs: app.middleware.append(kwargs)
    registered["on_app_started"][0](None, app)
    out = capsys.readouterr().out
    assert out.count("[SEG]") == 1
    assert "extensions/sd-perturbed-attention/scripts/seg.py" in out
    assert ALIAS in out
    assert app.middleware[0]["title"]() == expected  # the API guard asks per request


def test_no_startup_line_without_a_clash(loaded, capsys):
    module, registered, scripts = loaded
    scripts.scripts_data = [_script_data(module.SmoothedEnergyGuidanceScript, "seg.py")]
    app = SimpleNamespace(add_middleware=lambda cls, **kwargs: None)
    registered["on_app_started"][0](None, app)
    assert capsys.readouterr().out == ""
    assert module.SmoothedEnergyGuidanceScript().title() == TITLE
