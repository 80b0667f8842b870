"""The WebUI benchmark's arithmetic and requests, against a stand-in server whose step times are known."""

from __future__ import annotations

from typing import Any

import pytest

from seg_lib import bench_webui
from seg_lib.settings import FAST_PATH
from seg_lib.ui import TITLE

# seconds per step of each mode in the stand-in, and a fixed per-request cost (loading, text encoding, VAE)
PER_STEP = {"off": 2.0, "separate": 3.0, "fast": 2.5}
OVERHEAD = 7.0


def mode_of(payload: dict[str, Any]) -> str:
    seg = payload["alwayson_scripts"][TITLE]["args"]
    if not seg[0]:
        return "off"
    return "fast" if payload["override_settings"][FAST_PATH] else "separate"


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    requests: list[dict[str, Any]] = []

    def post(url: str, payload: dict[str, Any]) -> float:
        requests.append(payload)
        return OVERHEAD + payload["steps"] * PER_STEP[mode_of(payload)]

    monkeypatch.setattr(bench_webui, "_post", post)
    return requests


def test_per_step_time_cancels_the_per_request_cost(sent: list[dict[str, Any]]) -> None:
    per_step = bench_webui.measure("http://x", 512, None, 2, 1, 3, "m0", "inf")
    assert per_step == {
        bench_webui.OFF: [2.0, 2.0],
        bench_webui.SEPARATE: [3.0, 3.0],
        bench_webui.FAST: [2.5, 2.5],
    }
    # one warm-up per mode, then per repetition each mode's short and long request, interleaved
    assert [(mode_of(p), p["steps"]) for p in sent[:3]] == [("off", 1), ("separate", 1), ("fast", 1)]
    assert [(mode_of(p), p["steps"]) for p in sent[3:9]] == [
        ("off", 1), ("off", 3), ("separate", 1), ("separate", 3), ("fast", 1), ("fast", 3)
    ]  # fmt: skip
    assert len(sent) == 3 + 2 * 6


def test_requests_carry_the_case_and_a_dit_family_fields(sent: list[dict[str, Any]]) -> None:
    family = {
        "cfg_scale": 1,
        "sampler_name": "Euler",
        "width": 1024,
        "steps": 20,
        "override_settings": {"forge_additional_modules": ["ae.safetensors"]},
    }
    scripts = {"ControlNet": {"args": [{"enabled": False}]}}
    bench_webui.measure("http://x", 256, "model.safetensors", 1, 2, 4, "d0,m0", "2", scripts, family)
    for payload in sent:
        assert payload["width"] == payload["height"] == 256  # the bench's size, not the family's
        assert payload["steps"] in (2, 4)
        assert payload["cfg_scale"] == 1
        assert payload["alwayson_scripts"]["ControlNet"] == scripts["ControlNet"]
        settings = payload["override_settings"]
        assert settings["sd_model_checkpoint"] == "model.safetensors"
        assert settings["forge_additional_modules"] == ["ae.safetensors"]
        assert FAST_PATH in settings
    seg_on = [p["alwayson_scripts"][TITLE]["args"] for p in sent if mode_of(p) != "off"]
    assert len(seg_on) == 6  # separate and fast: a warm-up, a short and a long request each
    assert all(args[2:4] == ["2", "d0,m0"] for args in seg_on)


def test_report_gives_ratios_saving_and_machine_state(
    sent: list[dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    bench_webui.main(["--url", "http://x/", "--reps", "3", "--short", "1", "--long", "3"])
    out = capsys.readouterr().out
    assert "| SEG, fast path | 2.50 | 1.25x | 0.83x | 2.50, 2.50, 2.50 |" in out
    assert "| SEG, separate extra pass | 3.00 | 1.50x | 1.00x |" in out
    assert "fast path / SEG off, per repetition: 1.25x, 1.25x, 1.25x" in out
    assert "the fork saves 50% of the separate pass's extra cost" in out
    assert out.count("load average") == 2
