"""Smoothed Energy Guidance: the AlwaysVisible script. Thin on purpose: arguments in, the host adapter out.

Per-generation state lives on the processing object ``p`` (see ``seg_lib.host``), never on this class.
"""

from __future__ import annotations

from typing import Any

from modules import script_callbacks, scripts, shared

from seg_lib import api, names, settings, ui, xyz
from seg_lib.core.paste import normalize_pasted
from seg_lib.generation import params_for_generation
from seg_lib.host import HOST
from seg_lib.host.adapter import adapter_for
from seg_lib.log import log

ADAPTER = adapter_for(HOST)


class SmoothedEnergyGuidanceScript(scripts.Script):
    sorting_priority = 15  # Forge orders its always-on scripts by this

    def title(self) -> str:
        # The host finds alwayson_scripts by this; another "Smoothed Energy Guidance" may own the plain title.
        return _api_title()

    def show(self, is_img2img: bool) -> Any:
        return scripts.AlwaysVisible

    def ui(self, is_img2img: bool) -> list[Any]:
        accordion = ui.build_controls(self.elem_id)
        self._hires_link().built(accordion)
        self.infotext_fields = ui.infotext_fields(accordion.controls)
        self.paste_field_names = ui.PASTE_FIELD_NAMES
        return accordion.controls

    def after_component(self, component: Any, **kwargs: Any) -> None:
        # The tab's Hires fix checkbox, which shows or hides the SEG hires controls.
        self._hires_link().saw(component)

    def _hires_link(self) -> ui.HiresLink:
        # Per tab (each tab has its own Script instance); created on first use, so that a bare instance holds nothing.
        link = self.__dict__.get("hires_link")
        if link is None:
            link = self.hires_link = ui.HiresLink()
        return link

    def process(self, p: Any, *args: Any) -> None:
        ADAPTER.start(p, params_for_generation(p, args))

    def process_batch(self, p: Any, *args: Any, **kwargs: Any) -> None:
        ADAPTER.begin_batch(p)

    def process_before_every_sampling(self, p: Any, *args: Any, **kwargs: Any) -> None:
        ADAPTER.before_sampling(p)

    def postprocess_batch(self, p: Any, *args: Any, **kwargs: Any) -> None:
        ADAPTER.end_batch(p)

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        ADAPTER.finish(p)


def _api_title() -> str:
    cls = SmoothedEnergyGuidanceScript
    return names.api_title(names.loaded_scripts(cls), cls)


def _on_app_started(app: Any) -> None:
    others, first = names.same_titled(names.loaded_scripts(SmoothedEnergyGuidanceScript), SmoothedEnergyGuidanceScript)
    if others:
        log(names.clash_message(others, first))
    api.install(app, _api_title)


def _on_infotext_pasted(_infotext: str, fields: dict[str, Any]) -> None:
    for warning in normalize_pasted(fields):
        log(f"pasted infotext: {warning}")


ADAPTER.install_callbacks(script_callbacks)
settings.register(shared)  # at import, not on_ui_settings: an API-only WebUI never builds the settings page
script_callbacks.on_infotext_pasted(_on_infotext_pasted)
script_callbacks.on_before_ui(xyz.register_axes)
script_callbacks.on_app_started(lambda _demo, app: _on_app_started(app))
