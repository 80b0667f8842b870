"""Reliability runs against a running WebUI (not part of CI): the soak, the faults, two clients at once and
the HTTP fuzz. Skipped unless ``SEG_WEBUI_URL`` is set and ``SEG_RELIABILITY`` names the runs
(``soak,faults,concurrency,fuzz`` or ``all``); each writes its figures to ``SEG_RELIABILITY_OUT`` (a folder).
``control`` (named on its own, not part of ``all``) runs the soak's plan against the WebUI without the
extension, SEG never named: the host's own RSS growth and drift, to read SEG's figures against.

    # 1. once, the WebUI without the extension: records the probes' reference images
    SEG_WEBUI_URL=http://127.0.0.1:7860 SEG_RELIABILITY=all SEG_HOST=a1111 pytest tests/api/test_reliability.py
    # 2. with the extension (and, for the registration checks, tests/api/seg_probe linked into extensions/)
    SEG_WEBUI_URL=... SEG_RELIABILITY=all SEG_HOST=a1111 SEG_BROKEN_CHECKPOINT_DIR=<webui>/models/Stable-diffusion \\
        SEG_RELIABILITY_OUT=/tmp/seg-figures pytest tests/api/test_reliability.py -s

``SEG_SOAK_REQUESTS`` (default 200), ``SEG_SOAK_BLOCK`` (the repeated block, default 40),
``SEG_FUZZ_ARGS`` / ``SEG_FUZZ_INFOTEXT`` (default 250 / 120) and ``SEG_CONCURRENT_ROUNDS`` (2) size the
runs; ``SEG_RELOAD_UI=1`` adds A1111's Settings > Reload UI (the WebUI must run with its UI).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.api.probes import record_references, references
from tests.api.webui import URL, call, is_forge

RUNS = {run.strip() for run in os.environ.get("SEG_RELIABILITY", "").split(",") if run.strip()}
HOST = os.environ.get("SEG_HOST", "webui")
OUT = Path(os.environ.get("SEG_RELIABILITY_OUT", "/tmp/seg-reliability"))
pytestmark = [
    pytest.mark.webui,
    pytest.mark.skipif(not URL or not RUNS, reason="set SEG_WEBUI_URL and SEG_RELIABILITY to run these"),
]


def wanted(run: str) -> None:
    if run not in RUNS and "all" not in RUNS:
        pytest.skip(f"SEG_RELIABILITY does not name {run}")


def save(name: str, figures: dict[str, Any]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{HOST}-{name}.json").write_text(json.dumps(figures, indent=1))
    print(json.dumps(figures, indent=1))


@pytest.fixture(scope="module")
def forge() -> bool:
    status, scripts, _ = call("/sdapi/v1/scripts")
    assert status == 200, scripts
    if "smoothed energy guidance" not in [name.lower() for name in scripts["txt2img"]]:
        path = record_references(HOST, forge=is_forge())
        pytest.skip(f"the WebUI runs without the extension: recorded the references {path}")
    if references(HOST) is None:
        pytest.skip("no reference images: run this once against the WebUI without the extension")
    return is_forge()


def test_soak(forge: bool) -> None:
    wanted("soak")
    from tests.api.soak import run_soak

    total, block = int(os.environ.get("SEG_SOAK_REQUESTS", "200")), int(os.environ.get("SEG_SOAK_BLOCK", "40"))
    figures = run_soak(HOST, forge=forge, total=total, block=block)
    save("soak", figures)
    assert figures["errors"] == []
    assert figures["off_mismatches"] == []
    assert figures["on_mismatches"] == []
    assert figures["repeat_block_mismatches"] == []
    # Live memory first (glibc's heap in use, its free blocks not counted): a leak fails here
    in_use = figures["heap_in_use_growth_after_warmup_mib"]
    assert in_use is None or in_use < 50
    assert figures["rss_growth_after_warmup_mib"] < 50
    assert abs(figures["drift_last20_vs_first20_seg_on"]) <= 0.10


def test_soak_without_extension() -> None:
    """The soak's plan against the WebUI without the extension (``SEG_RELIABILITY=control``): the host's own
    RSS growth and drift, the baseline for SEG's figures."""
    if "control" not in RUNS:
        pytest.skip("SEG_RELIABILITY does not name control")
    status, scripts, _ = call("/sdapi/v1/scripts")
    assert status == 200, scripts
    if "smoothed energy guidance" in [name.lower() for name in scripts["txt2img"]]:
        pytest.skip("the control runs against the WebUI without the extension")
    from tests.api.soak import run_soak

    total, block = int(os.environ.get("SEG_SOAK_REQUESTS", "200")), int(os.environ.get("SEG_SOAK_BLOCK", "40"))
    figures = run_soak(HOST, forge=is_forge(), total=total, block=block, control=True)
    save("soak-control", figures)
    assert figures["errors"] == []
    assert figures["off_mismatches"] == []
    assert figures["repeat_block_mismatches"] == []


def test_concurrency(forge: bool) -> None:
    wanted("concurrency")
    from tests.api.concurrency import run_concurrency

    figures = run_concurrency(forge=forge, rounds=int(os.environ.get("SEG_CONCURRENT_ROUNDS", "2")))
    save("concurrency", figures)
    assert figures["mismatches"] == []


def test_fuzz_over_http(forge: bool) -> None:
    wanted("fuzz")
    from tests.api.fuzz_http import run_fuzz

    figures = run_fuzz(
        int(os.environ.get("SEG_FUZZ_ARGS", "250")), int(os.environ.get("SEG_FUZZ_INFOTEXT", "120")), forge=forge
    )
    save("fuzz", figures)
    assert figures["failures"] == []
    assert figures["server_alive"]


def test_faults(forge: bool) -> None:
    wanted("faults")
    from tests.api.faults import run_faults

    folder = os.environ.get("SEG_BROKEN_CHECKPOINT_DIR")
    reload_ui = os.environ.get("SEG_RELOAD_UI") == "1"
    figures = run_faults(HOST, forge=forge, broken_folder=Path(folder) if folder else None, reload_ui=reload_ui)
    save("faults", figures)
    assert figures["off_mismatches"] == []
    assert figures["on_mismatches"] == []
    for case in figures["cases"]:
        assert "error" not in case or case["case"] == "broken checkpoint", case
        assert case["registrations_unchanged"] or case["registrations"] is None, case
        if case["registrations"] is not None:
            counts = [*case["registrations"]["callbacks"].values(), *case["registrations"]["xyz_axes"].values()]
            assert set(counts) <= {1}, case["registrations"]
