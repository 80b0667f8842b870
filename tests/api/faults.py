"""Faults against a running WebUI: interrupt and skip mid-generation with SEG on, model switches between SEG
requests, a checkpoint that fails to load, and (A1111 with its UI) the UI reload that reloads every script.

After each fault the probes run (SEG off equals the WebUI without the extension, SEG on equals the same
request before the faults) and, with the test-only probe extension, SEG's registrations are read back.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.api.probes import ON, ProbeCheck
from tests.api.webui import (
    INPAINT,
    SD15,
    SDXL,
    SEG_KEYS,
    call,
    generate,
    in_background,
    payload,
    registrations,
    wait_until_up,
)

BROKEN = "seg-broken-test.safetensors"


def _wait_for_step(step: int, timeout: float = 120) -> int:
    """The sampling step the running job reached once it is at ``step`` or later (-1: never seen)."""
    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        status, progress, _ = call("/sdapi/v1/progress?skip_current_image=true", timeout=10)
        if status == 200 and progress["state"].get("sampling_step", 0) >= step and progress["state"].get("job_count"):
            return progress["state"]["sampling_step"]
        time.sleep(0.1)
    return -1


def _stop_mid_generation(action: str, *, forge: bool) -> dict[str, Any]:
    body = payload("txt2img", ON, forge=forge, width=96, height=96, steps=8)
    thread, result = in_background("/sdapi/v1/txt2img", body)
    at_step = _wait_for_step(2)
    call(f"/sdapi/v1/{action}", {})
    thread.join(600)
    return {"case": action, "at_step": at_step, "of_steps": 8, "status": result.get("status")}


def _has_checkpoint(title: str) -> bool:
    status, models, _ = call("/sdapi/v1/sd-models")
    return status == 200 and any(model.get("title", "").startswith(title) for model in models)


def _model_switch(*, forge: bool) -> dict[str, Any]:
    """SD1.5 -> SDXL -> inpainting -> SD1.5, a SEG request on each (the SDXL leg when the WebUI has one)."""
    legs = [("txt2img", SDXL)] if _has_checkpoint(SDXL) else []
    legs += [("txt2img", INPAINT), ("inpaint", INPAINT), ("txt2img", SD15)]
    statuses = []
    for kind, checkpoint in legs:
        body, _ = generate(kind, ON, forge=forge, override_settings={"sd_model_checkpoint": checkpoint})
        statuses.append({"kind": kind, "checkpoint": checkpoint, "seg_in_infotext": SEG_KEYS[0] in body["info"]})
    route = " -> ".join(["SD1.5", *(("SDXL",) if legs[0][1] == SDXL else ()), "inpainting", "SD1.5"])
    return {"case": f"model switch {route}", "requests": statuses}


def _broken_checkpoint(folder: Path, *, forge: bool) -> dict[str, Any]:
    path = folder / BROKEN
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\x00" * 64)  # header length, bad header
    try:
        call("/sdapi/v1/refresh-checkpoints", {})
        status, body, _ = call(
            "/sdapi/v1/txt2img", payload("txt2img", ON, forge=forge, override_settings={"sd_model_checkpoint": BROKEN})
        )
    finally:
        host_removed = not path.exists()  # Forge moves a checkpoint it cannot read to <name>.corrupted
        path.unlink(missing_ok=True)
        path.with_name(path.name + ".corrupted").unlink(missing_ok=True)
        call("/sdapi/v1/refresh-checkpoints", {})
    return {
        "case": "checkpoint that fails to load",
        "status": status,
        "answer": str(body)[:200],
        "host_removed_the_file": host_removed,
    }


def _restart_button_fn_index() -> int:
    status, config, _ = call("/config")
    assert status == 200, "the reload needs the UI (start A1111 without --nowebui)"
    button = next(
        c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "settings_restart_gradio"
    )
    for index, dependency in enumerate(config["dependencies"]):
        targets = [t[0] if isinstance(t, list | tuple) else t for t in dependency.get("targets", [])]
        if button in targets:
            return index
    raise AssertionError("no event on the Reload UI button")


def _reload_ui() -> dict[str, Any]:
    """Settings > Reload UI: the same gradio event the button fires (A1111 reloads every script module)."""
    status, body, _ = call("/run/predict", {"fn_index": _restart_button_fn_index(), "data": [], "session_hash": "seg"})
    went_down = False
    end = time.perf_counter() + 60
    while time.perf_counter() < end and not went_down:
        went_down = call("/sdapi/v1/sd-models", timeout=5)[0] == 0
        time.sleep(0.2)
    back_after = wait_until_up()
    return {
        "case": "Reload UI (gradio event of Settings > Reload UI)",
        "status": status,
        "went_down": went_down,
        "back_after_s": round(back_after, 1),
        "answer": str(body)[:120],
    }


def run_faults(host: str, *, forge: bool, broken_folder: Path | None, reload_ui: bool) -> dict[str, Any]:
    probes = ProbeCheck(host, forge=forge)
    probes.check("before faults")
    before = registrations()
    cases = []
    steps: list[tuple[str, Any]] = [
        ("interrupt", lambda: _stop_mid_generation("interrupt", forge=forge)),
        ("skip", lambda: _stop_mid_generation("skip", forge=forge)),
        ("model switch", lambda: _model_switch(forge=forge)),
    ]
    if reload_ui:
        steps.append(("reload", _reload_ui))
    if broken_folder is not None:  # last: A1111 1.10.1 stays broken after it (see the README)
        steps.append(("broken checkpoint", lambda: _broken_checkpoint(broken_folder, forge=forge)))
    for name, action in steps:
        try:
            case = action()
            # all probes after the reload (A1111) or the last fault; the quick one in between (CPU time)
            probes.check(f"after {name}", None if name == steps[-1][0] or name == "reload" else ["probe-t2i"])
        except AssertionError as error:  # recorded, and the next fault still runs
            case = {"case": name, "error": str(error)[:300]}
        case["registrations"] = registrations()
        case["registrations_unchanged"] = case["registrations"] == before
        cases.append(case)
    return {"registrations_before": before, "cases": cases, **probes.figures()}
