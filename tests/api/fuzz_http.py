"""The fuzz of tests/test_fuzz.py over HTTP against a running WebUI: malformed ``alwayson_scripts`` SEG
entries and malformed SEG keys in the request's ``infotext``. Every case must be answered 422 naming the
field, or accepted, with the generation's infotext holding only in-range SEG values (the ones sent, or the
documented defaults); never 500, never a dead server. Returns counts of the cases tried."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from seg_lib.core.blocks import SD1_LAYOUT, resolve_layers
from seg_lib.core.params import BY_INFOTEXT, params_from_args, to_infotext
from tests.api.webui import SD15, TITLE, call
from tests.test_fuzz import entries, infotext_values, names_a_field

BASE = {
    "prompt": "x",
    "steps": 1,
    "width": 64,
    "height": 64,
    "sampler_name": "Euler",
    "seed": 1,
    "override_settings": {"sd_model_checkpoint": SD15},
}
seg_keys = st.sampled_from([*BY_INFOTEXT, "seg_scale", "seg_enabled"])
infotexts = st.builds(
    lambda pairs, tail: "a cat\nSteps: 1, " + ", ".join(f"{k}: {v}" for k, v in pairs) + tail,
    st.lists(st.tuples(seg_keys, infotext_values), max_size=6),
    st.sampled_from(["", ", Seed: 3", "\n", ', SEG Layers: "d0,m0"', "SEG Scale: 3, SEG Scale: x"]),
)


def _seg_values(info: str) -> dict[str, str]:
    text = json.loads(info)["infotexts"][0]
    last = text.strip().splitlines()[-1]
    found = {}
    for key in BY_INFOTEXT:
        if f"{key}: " in last:
            rest = last.split(f"{key}: ", 1)[1]
            found[key] = json.loads(rest.split('",', 1)[0] + '"') if rest.startswith('"') else rest.split(",")[0]
    return found


def _expected(args: Any) -> dict[str, str]:
    """What the infotext must say for valid args: SEG keys only when SEG is on and the model has the layers."""
    params = params_from_args(args)
    if not params.enabled:
        return {}
    try:
        resolve_layers(params.layers, SD1_LAYOUT)
    except ValueError:
        return {}  # documented: one console line, the image made without SEG
    return to_infotext(params)


# Forge's txt2img fails on the request's ``infotext`` field itself, extension or not (its API model's field
# type trips ``isinstance``); a case SEG's guard lets through meets that, and says nothing about SEG
FORGE_INFOTEXT_QUIRK = "isinstance() argument 2 cannot be a parameterized generic"


def run_fuzz(args_cases: int, infotext_cases: int, *, forge: bool = False) -> dict[str, Any]:
    counts: Counter[str] = Counter()
    failures: list[str] = []

    def check(request: dict[str, Any], expected: dict[str, str] | None) -> None:
        status, body, _ = call("/sdapi/v1/txt2img", {**BASE, **request})
        counts[f"HTTP {status}"] += 1
        case = json.dumps(request)[:300]
        if forge and status == 500 and "infotext" in request and FORGE_INFOTEXT_QUIRK in str(body):
            counts["of which Forge's own infotext-field TypeError (past SEG's guard)"] += 1
            return
        if status == 422:
            detail = body.get("detail") if isinstance(body, dict) else None
            if not (isinstance(detail, str) and (names_a_field(detail) or detail.startswith('SEG: infotext "SEG'))):
                failures.append(f"422 without the field named: {str(body)[:200]} for {case}")
        elif status == 200:
            found = _seg_values(body["info"])
            for key, value in found.items():
                try:
                    BY_INFOTEXT[key].check(value)
                except ValueError as error:
                    failures.append(f"ran with an out-of-range {key}={value!r} ({error}) for {case}")
            if expected is not None and found != expected:
                failures.append(f"ran with SEG {found}, expected {expected} for {case}")
        elif status != 400:  # 400: a body the host itself cannot read
            failures.append(f"HTTP {status}: {str(body)[:200]} for {case}")

    quick = settings(deadline=None, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck))

    @settings(quick, max_examples=args_cases)
    @given(key=st.sampled_from([TITLE, TITLE.lower()]), entry=entries)
    def fuzz_args(key: str, entry: Any) -> None:
        expected = {} if isinstance(entry, dict) and "args" not in entry else None  # host defaults: SEG off
        if isinstance(entry, dict) and isinstance(entry.get("args"), list):
            try:
                expected = _expected(entry["args"])
            except ValueError:
                expected = None  # the guard must answer 422
        check({"alwayson_scripts": {key: entry}}, expected)

    @settings(quick, max_examples=infotext_cases)
    @given(text=infotexts)
    def fuzz_infotext(text: str) -> None:
        check({"infotext": text}, None)

    fuzz_args()
    fuzz_infotext()
    alive = call("/sdapi/v1/sd-models")[0] == 200
    cases = sum(n for key, n in counts.items() if key.startswith("HTTP"))
    return {"cases": cases, "by_status": dict(counts), "failures": failures, "server_alive": alive}
