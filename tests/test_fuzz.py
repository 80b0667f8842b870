"""Fuzzed input, host-free: malformed SEG arguments (API ``alwayson_scripts`` and the request guard) and
malformed pasted infotext. Every case must end in a ``ValueError`` / HTTP 422 that names the field, or in
settings that are all in range, with the documented default for every value not given; nothing else may
escape (an escaping exception is an HTTP 500 in the host, or a broken paste).

The same strategies drive the live HTTP fuzz (``tests/api/test_reliability.py``).
"""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seg_lib.api import MAX_MESSAGE, SegArgumentGuard, check_request
from seg_lib.core.blocks import parse_layers
from seg_lib.core.params import BY_INFOTEXT, BY_NAME, PARAMS, SegParams, params_from_args
from seg_lib.core.paste import normalize_pasted, seg_from_infotext
from tests.guard_driver import through_guard

TITLE = "Smoothed Energy Guidance"
FIELD_NAMES = [param.name for param in PARAMS]
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- strategies ------------------------------------------------------------------------------------------------
huge_text = st.sampled_from(["x" * 100_000, "9" * 5_000, "m0," * 20_000, "\x00" * 1000, "inf" * 1000])
layer_tokens = ["d", "m", "u", "input", "middle", "output", "0", "3", "12", "-", ".", ",", " ", "9" * 30, "x", "٣"]
bad_layers = st.lists(st.sampled_from(layer_tokens), max_size=8).map("".join)
near_valid = st.sampled_from(
    [
        *(True, False, 0, 1, 2, -1, 0.5, 3, "3", 30, 30.0001, 1e308, 10**400, "1e400", "-inf", "inf", "nan"),
        *("", " ", "m0", "d0-d3", "u0.4", "d2.2-9", "input4", "d3-d1", "m0.5-2", "true", "off", "yes", "∞", "0.01"),
    ]
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10**400), max_value=10**400),  # JSON numbers have any length
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    bad_layers,
    near_valid,
    huge_text,
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
field_keys = st.one_of(st.sampled_from(FIELD_NAMES), st.sampled_from(["sigma", "Enabled", "", "scale "]), st.text())
positional = st.lists(st.one_of(near_valid, json_values), max_size=9)
named = st.dictionaries(field_keys, st.one_of(near_valid, json_values), max_size=7)
seg_args = st.one_of(positional, named.map(lambda d: [d]), named, json_values)


def in_range(params: SegParams) -> None:
    """Every value of settings a generation would run with is inside its documented range."""
    assert isinstance(params.enabled, bool)
    assert 0.0 <= params.scale <= 30.0
    assert params.blur_sigma == math.inf or 0.01 <= params.blur_sigma <= 9999
    assert parse_layers(params.layers)  # a selector that parses
    assert 0.0 <= params.start <= params.end <= 1.0


def names_a_field(message: str) -> bool:
    """The message says which value was wrong: a field name, the ``args`` list or the script entry."""
    return message.startswith("SEG") and any(
        word in message for word in [*(f"({n})" for n in FIELD_NAMES), "argument", '"args"', "alwayson_scripts"]
    )


# -- argument parsing ------------------------------------------------------------------------------------------
@FUZZ
@given(args=seg_args)
def test_fuzzed_arguments_are_rejected_by_name_or_parsed_in_range(args: Any) -> None:
    try:
        params = params_from_args(args)
    except ValueError as error:
        message = str(error)
    else:
        message = ""
    if message:
        assert names_a_field(message), message
        return
    in_range(params)
    given_ = args[0] if isinstance(args, list) and len(args) == 1 and isinstance(args[0], dict) else args
    if isinstance(given_, dict):
        missing = [name for name in FIELD_NAMES if name not in given_]
    else:
        missing = FIELD_NAMES[len(given_ or []) :]
    for name in missing:  # documented defaults for every value not sent
        assert getattr(params, name) == BY_NAME[name].default


# -- the HTTP guard --------------------------------------------------------------------------------------------
title_keys = st.sampled_from([TITLE, TITLE.lower(), TITLE.upper()])
entries = st.one_of(
    seg_args.map(lambda a: {"args": a}),
    st.fixed_dictionaries({}, optional={"args": st.none(), "other": json_values}),
    json_values,
)
requests = st.fixed_dictionaries(
    {"prompt": st.just("x")},
    optional={
        "alwayson_scripts": st.one_of(st.dictionaries(title_keys, entries, min_size=1), json_values),
        "infotext": st.one_of(st.text(max_size=40), json_values),
    },
)


def simple_infotext_parser(text: str) -> dict[str, str]:
    """Stand-in for the host's parser: ``Key: value`` pairs on the last line, split at commas."""
    line = text.strip().splitlines()[-1] if text.strip() else ""
    pairs = (item.split(":", 1) for item in line.split(",") if ":" in item)
    return {key.strip(): value.strip() for key, value in pairs}


def _through_guard(body: bytes, chunk: int) -> tuple[int, bytes]:
    chunk = max(chunk, len(body) // 8)  # at most 8 pieces: a 100 kB body in 1-byte pieces is just slow
    pieces = [body[i : i + chunk] for i in range(0, len(body), chunk)] or [b""]
    sent, seen = through_guard(pieces, "/sdapi/v1/txt2img", TITLE, simple_infotext_parser)
    if sent[0]["status"] == 200:
        assert seen == [body]  # passed on byte for byte
    return sent[0]["status"], sent[1]["body"]


@FUZZ
@given(request=requests, chunk=st.integers(1, 4096))
def test_fuzzed_requests_get_422_naming_the_field_or_pass_untouched(request: dict, chunk: int) -> None:
    body = json.dumps(request).encode()
    status, answer = _through_guard(body, chunk)
    assert status in (200, 422)
    if status == 422:
        detail = json.loads(answer)["detail"]
        assert len(detail) <= MAX_MESSAGE + 80
        assert names_a_field(detail) or detail.startswith('SEG: infotext "SEG '), detail
        return
    # Passed on: whatever the host takes for SEG parses in range.
    scripts = request.get("alwayson_scripts")
    for key, entry in scripts.items() if isinstance(scripts, dict) else []:
        if key.lower() == TITLE.lower() and "args" in entry:
            in_range(params_from_args(entry["args"]))
    if isinstance(request.get("infotext"), str):
        fields = simple_infotext_parser(request["infotext"])
        ours = {key: fields[key] for key in BY_INFOTEXT if key in fields}
        for key, value in ours.items():
            BY_INFOTEXT[key].check(value)


@FUZZ
@given(raw=st.one_of(st.binary(max_size=200), st.sampled_from([b"[" * 100_000, b'{"alwayson_scripts": 1e999}'])))
def test_any_body_bytes_never_raise(raw: bytes) -> None:
    result = check_request(raw, TITLE, simple_infotext_parser)
    assert result is None or names_a_field(result)


def test_the_cases_the_fuzz_found_stay_fixed() -> None:
    def body(entry: Any, key: str = TITLE) -> bytes:
        return json.dumps({"alwayson_scripts": {key: entry}}).encode()

    # a 400-digit integer used to escape as OverflowError (an HTTP 500)
    assert "(scale)" in check_request(
        b'{"alwayson_scripts": {"%s": {"args": [true, 1%s]}}}' % (TITLE.encode(), b"0" * 400), TITLE
    )
    # the host indexes the entry with "args" and takes len(args): these were HTTP 500s in the host
    assert "alwayson_scripts" in check_request(body(5), TITLE)
    assert "alwayson_scripts" in check_request(body("xargs"), TITLE)
    assert '"args" must be a list' in check_request(body({"args": None}), TITLE)
    # other keys next to "args": the host echoes the request, and a 20-digit number there fails its answer
    assert 'takes only "args"' in check_request(body({"x": 10**30}), TITLE)
    # the host matches titles case-blind and the last entry wins: every one is checked
    both = {"alwayson_scripts": {TITLE.lower(): {"args": [True]}, TITLE: {"args": [True, 99]}}}
    assert "(scale)" in check_request(json.dumps(both).encode(), TITLE)
    # nested too deep for json: the host's business, not an exception here
    assert check_request(b"[" * 100_000, TITLE) is None
    # a huge value comes back shortened
    assert len(check_request(body({"args": [True, "x" * 100_000]}), TITLE)) <= MAX_MESSAGE + 80
    # infotext: the host would run float("abc") on it (HTTP 500); the key is named
    text = json.dumps({"infotext": "a cat\nSteps: 1, SEG Scale: abc"}).encode()
    assert check_request(text, TITLE, simple_infotext_parser).startswith('SEG: infotext "SEG Scale"')
    text = json.dumps({"infotext": "a cat\nSEG Start: 0.9, SEG End: 0.1"}).encode()
    assert "must not be after" in check_request(text, TITLE, simple_infotext_parser)
    assert check_request(json.dumps({"infotext": "a\nSEG Scale: 2"}).encode(), TITLE, simple_infotext_parser) is None


def test_a_failing_check_passes_the_request_on(monkeypatch, capsys) -> None:
    import seg_lib.api

    def broken(*_args: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(seg_lib.api, "prepare_request", broken)
    body = json.dumps({"alwayson_scripts": {TITLE: {"args": [True]}}}).encode()
    assert _through_guard(body, 7)[0] == 200
    assert "[SEG] could not check" in capsys.readouterr().out


# -- pasted infotext -------------------------------------------------------------------------------------------
infotext_values = st.one_of(st.text(max_size=20), near_valid.map(str), bad_layers, huge_text)
legacy_keys = ["seg_enabled", "seg_scale", "seg_blur_sigma", "seg_block", "seg_block_id", "seg_block_list"]
pasted = st.dictionaries(
    st.sampled_from([*BY_INFOTEXT, *legacy_keys, "seg_sigma_start", "Steps", "Sampler"]), infotext_values, max_size=9
)


@FUZZ
@given(fields=pasted)
def test_fuzzed_pasted_infotext_never_breaks_and_keeps_values_in_range(fields: dict[str, str]) -> None:
    params, warnings = seg_from_infotext(fields)
    in_range(params)
    assert all(isinstance(w, str) for w in warnings)
    had_seg = any(key in fields for key in BY_INFOTEXT) or "seg_enabled" in fields
    pasted_fields = dict(fields)
    normalize_pasted(pasted_fields)
    # what the host then pastes into the controls: only our keys, each valid; "SEG Scale" always there
    ours = {key: value for key, value in pasted_fields.items() if key in BY_INFOTEXT}
    assert "SEG Scale" in ours
    if not params.enabled:
        assert ours == {"SEG Scale": "False"}
        return
    assert had_seg
    for key, value in ours.items():
        BY_INFOTEXT[key].check(value)
    # values that were malformed keep the control's value; those pasted equal what the parser read
    read = {param.infotext: param.format(getattr(params, param.name)) for param in PARAMS if param.infotext}
    assert all(read[key] == value for key, value in ours.items())


def test_the_guard_is_installed_into_an_app_that_already_serves() -> None:
    """A1111 with its UI calls ``on_app_started`` after the app has answered requests (Starlette then raises
    "Cannot add middleware after an application has started"; seen in the real A1111 1.10.1)."""
    from seg_lib.api import install

    class StartedApp:  # the parts of starlette.applications.Starlette that install touches
        def __init__(self) -> None:
            self.user_middleware: list[tuple[Any, dict]] = []
            self.middleware_stack: object | None = object()  # built by the first request

        def add_middleware(self, cls: Any, **options: Any) -> None:
            if self.middleware_stack is not None:
                raise RuntimeError("Cannot add middleware after an application has started")
            self.user_middleware.insert(0, (cls, options))

    app = StartedApp()
    install(app, TITLE)
    assert [cls for cls, _ in app.user_middleware] == [SegArgumentGuard]
    assert app.middleware_stack is None  # rebuilt, with the guard, on the next request
