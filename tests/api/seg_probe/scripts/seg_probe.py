"""Test-only WebUI extension (never shipped with SEG): reports what SEG has registered in the host, so the
reliability runs can check that callbacks, XYZ axes and the API guard exist once, also after a reload.

Install for a run: ``ln -s <repo>/tests/api/seg_probe <webui>/extensions/seg-probe``; then
``GET /seg-probe/registrations``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from modules import script_callbacks, scripts

_apps: list[Any] = []  # the app the host serves now (a reload starts a new one)


def _is_seg(callback: Any) -> bool:
    module = getattr(callback.callback, "__module__", "") or ""
    return module.startswith("seg_lib") or module == "seg.py" or "sd-webui-seg" in str(callback.script)


def _callbacks() -> dict[str, int]:
    counts: Counter[str] = Counter()
    for category, callbacks in script_callbacks.callback_map.items():
        counts.update(category.removeprefix("callbacks_") for cb in callbacks if _is_seg(cb))
    return dict(counts)


def _ordered() -> dict[str, int]:
    """The lists the host really dispatches from (user-sortable order, cached), for the SEG categories."""
    if not hasattr(script_callbacks, "ordered_callbacks"):
        return {}
    found = {}
    for category in _callbacks():
        found[category] = sum(_is_seg(cb) for cb in script_callbacks.ordered_callbacks(category))
    return found


def _xyz_axes() -> dict[str, int]:
    for data in scripts.scripts_data:
        if data.script_class.__module__ == "xyz_grid.py":
            return dict(Counter(o.label for o in data.module.axis_options if str(o.label).startswith("[SEG]")))
    return {}


def _xyz_labels(img2img: bool = False) -> list[str]:
    """The labels the XYZ script's "X type" index points into on a tab: the list its ``ui()`` kept (an
    API-only WebUI may build it before the extensions' ``before_ui`` callbacks add their axes)."""
    runner = scripts.scripts_img2img if img2img else scripts.scripts_txt2img
    for script in getattr(runner, "scripts", []):
        if type(script).__module__ == "xyz_grid.py" and hasattr(script, "current_axis_options"):
            return [option.label for option in script.current_axis_options]
    return []


def _seg_scripts() -> dict[str, int]:
    runners = {"txt2img": scripts.scripts_txt2img, "img2img": scripts.scripts_img2img}
    return {
        tab: sum(s.title().lower() == "smoothed energy guidance" for s in runner.scripts)
        for tab, runner in runners.items()
        if runner is not None
    }


def _registrations() -> dict[str, Any]:
    app = _apps[-1] if _apps else None
    guards = [m for m in getattr(app, "user_middleware", []) if getattr(m.cls, "__name__", "") == "SegArgumentGuard"]
    return {
        "callbacks": _callbacks(),
        "ordered_callbacks": _ordered(),
        "xyz_axes": _xyz_axes(),
        "api_guards": len(guards),
        "scripts": _seg_scripts(),
    }


def _host() -> dict[str, Any]:
    """What SEG read from the running host (``seg_lib/host/forge_host.py``): its conventions, the fork's variant."""
    try:
        from seg_lib.host import HOST
    except ImportError:  # the control run: SEG is not installed
        return {"host": None}
    found: dict[str, Any] = {"host": HOST}
    if HOST in ("forge", "forge-legacy"):
        from seg_lib.host.forge_host import ForgeHost

        host = ForgeHost.load(HOST)
        found["conventions"] = {**vars(host.conventions), "batch": repr(host.conventions.batch)}
        found["forward"] = [variant.name for variant in (host.unet_forwards or {}).values()] or host.not_forked
    return found


def _on_app_started(_demo: Any, app: Any) -> None:
    _apps[:] = [app]
    app.add_api_route("/seg-probe/registrations", _registrations, methods=["GET"])
    app.add_api_route("/seg-probe/host", _host, methods=["GET"])
    app.add_api_route("/seg-probe/xyz-labels", _xyz_labels, methods=["GET"])


script_callbacks.on_app_started(_on_app_started)
