"""The parameter table: defaults, validation messages, API arguments and infotext round trips."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seg_lib.core.params import (
    BY_INFOTEXT,
    PARAMS,
    SegParams,
    has_seg_infotext,
    params_from_args,
    params_from_infotext,
    to_infotext,
)


def test_table_order_names_and_defaults():
    # the first six are the original positional API order; new settings are appended after them
    assert [p.name for p in PARAMS] == [
        "enabled",
        "scale",
        "blur_sigma",
        "layers",
        "start",
        "end",
        "rescale",
        "rescale_mode",
        "hires",
        "hires_scale",
        "hires_blur_sigma",
        "hires_layers",
    ]
    assert SegParams().values() == [False, 3.0, math.inf, "m0", 0.0, 1.0, 0.0, "full", "same", 3.0, math.inf, "m0"]
    assert [p.label for p in PARAMS][:6] == ["Enabled", "Scale", "Blur sigma", "Layers", "Start", "End"]
    assert list(BY_INFOTEXT)[:5] == ["SEG Scale", "SEG Sigma", "SEG Layers", "SEG Start", "SEG End"]
    assert list(BY_INFOTEXT)[5:] == [
        "SEG Rescale",
        "SEG Rescale Mode",
        "SEG Hires",
        "SEG Hires Scale",
        "SEG Hires Sigma",
        "SEG Hires Layers",
    ]
    assert all(p.help and p.rule for p in PARAMS)


def test_positional_named_and_object_forms_agree():
    positional = params_from_args([True, 4, "10", "d0-d1,m0", 0.1, "0.9"])
    named = params_from_args(
        {"enabled": True, "scale": 4, "blur_sigma": 10, "layers": "d0-d1, m0", "start": 0.1, "end": 0.9}
    )
    wrapped = params_from_args(
        [
            {
                "enabled": "true",
                "scale": "4",
                "blur_sigma": 10.0,
                "layers": "d0-d1,m0",
                "start": "0.1",
                "end": 0.9,
            }
        ]
    )
    assert positional == named == wrapped
    assert positional == SegParams(True, 4.0, 10.0, "d0-d1,m0", 0.1, 0.9)


def test_missing_values_keep_defaults():
    assert params_from_args([True]) == SegParams(enabled=True)
    assert params_from_args({"enabled": True, "blur_sigma": "inf"}) == SegParams(enabled=True)
    assert params_from_args(None) == SegParams()
    assert params_from_args([]) == SegParams()


@pytest.mark.parametrize("value", ["inf", "Infinity", " INF ", "∞", math.inf, 1e5, "10000", 9999.01])
def test_infinite_sigma_spellings(value):
    assert params_from_args({"blur_sigma": value}).blur_sigma == math.inf


@pytest.mark.parametrize("value", [0.01, 1, "2.5", 9999])
def test_finite_sigma(value):
    assert params_from_args({"blur_sigma": value}).blur_sigma == float(value)


@pytest.mark.parametrize(
    ("args", "names"),
    [
        ({"scale": 31}, "scale (scale)"),
        ({"scale": -0.5}, "scale (scale)"),
        ({"scale": "lots"}, "scale (scale)"),
        ({"scale": True}, "scale (scale)"),
        ({"scale": math.nan}, "scale (scale)"),
        ({"blur_sigma": -1}, "blur sigma (blur_sigma)"),
        ({"blur_sigma": 0}, "blur sigma (blur_sigma)"),
        ({"blur_sigma": 0.001}, "blur sigma (blur_sigma)"),
        ({"blur_sigma": "nan"}, "blur sigma (blur_sigma)"),
        ({"blur_sigma": None}, "blur sigma (blur_sigma)"),
        ({"layers": "q7"}, "layers (layers)"),
        ({"layers": ""}, "layers (layers)"),
        ({"layers": 5}, "layers (layers)"),
        ({"start": 1.5}, "start (start)"),
        ({"end": "-0.1"}, "end (end)"),
        ({"enabled": "maybe"}, "enabled (enabled)"),
        ({"enabled": 2}, "enabled (enabled)"),
        ({"start": 0.8, "end": 0.2}, "start (start) must not be after SEG end (end)"),
        ({"rescale": 1.5}, "rescale (rescale)"),
        ({"rescale": "-0.1"}, "rescale (rescale)"),
        ({"rescale_mode": "half"}, "rescale mode (rescale_mode) must be one of full, partial, snf"),
        ({"rescale_mode": 1}, "rescale mode (rescale_mode)"),
        ({"hires": "maybe"}, "hires fix (hires) must be one of same, off, override"),
        ({"hires_scale": 31}, "hires scale (hires_scale)"),
        ({"hires_blur_sigma": 0}, "hires blur sigma (hires_blur_sigma)"),
        ({"hires_layers": "q1"}, "hires layers (hires_layers)"),
    ],
)
def test_invalid_values_name_the_parameter(args, names):
    with pytest.raises(ValueError, match="SEG") as error:
        params_from_args(args)
    assert names in str(error.value)
    assert "got" in str(error.value)


def test_unknown_and_surplus_arguments():
    with pytest.raises(ValueError, match=r"unknown argument.*sigma; known: enabled, scale, blur_sigma"):
        params_from_args({"enabled": True, "sigma": 3})
    with pytest.raises(ValueError, match="at most 12 arguments"):
        params_from_args([True, 3, "inf", "m0", 0, 1, 0, "full", "same", 3, "inf", "m0", "extra"])
    with pytest.raises(ValueError, match="list or an object"):
        params_from_args("enabled")


def test_infotext_only_when_enabled():
    assert to_infotext(SegParams()) == {}
    assert to_infotext(SegParams(enabled=True)) == {
        "SEG Scale": "3.0",
        "SEG Sigma": "inf",
        "SEG Layers": "m0",
        "SEG Start": "0.0",
        "SEG End": "1.0",
    }


def test_infotext_without_seg_turns_seg_off():
    fields = {"Steps": "20", "Sampler": "Euler a", "CFG scale": "7"}
    assert not has_seg_infotext(fields)
    assert params_from_infotext(fields) == (SegParams(), [])


def test_partial_infotext_fills_defaults():
    params, warnings = params_from_infotext({"SEG Scale": "2.5"})
    assert params == SegParams(enabled=True, scale=2.5)
    assert warnings == []


def test_malformed_infotext_strict_and_lenient():
    fields = {"SEG Scale": "abc", "SEG Sigma": "4", "SEG Layers": "m0"}
    with pytest.raises(ValueError, match="scale"):
        params_from_infotext(fields)
    params, warnings = params_from_infotext(fields, strict=False)
    assert params == SegParams(enabled=True, blur_sigma=4.0)
    assert len(warnings) == 1
    assert "SEG Scale" in warnings[0]
    assert "kept 3.0" in warnings[0]


def test_lenient_infotext_with_start_after_end_keeps_default_window():
    params, warnings = params_from_infotext({"SEG Start": "0.9", "SEG End": "0.1"}, strict=False)
    assert (params.start, params.end) == (0.0, 1.0)
    assert len(warnings) == 1
    assert "start" in warnings[0]


layer_texts = st.sampled_from(["m0", "d0-d3,m0", "u0.4", "d2.2-9", "d0,u1-u3", "m0.0-9"])
numbers = st.floats(0, 30, allow_nan=False)
fractions = st.floats(0, 1, allow_nan=False)
sigmas = st.one_of(st.floats(0.01, 9999, allow_nan=False), st.just(math.inf))


@given(
    scale=numbers,
    sigma=sigmas,
    layers=layer_texts,
    a=fractions,
    b=fractions,
    rescale=fractions,
    mode=st.sampled_from(["full", "partial", "snf"]),
    hires=st.sampled_from(["same", "off", "override"]),
    hires_scale=numbers,
    hires_sigma=sigmas,
    hires_layers=layer_texts,
)
@settings(max_examples=200, deadline=None)
def test_round_trips_are_exact(
    scale, sigma, layers, a, b, rescale, mode, hires, hires_scale, hires_sigma, hires_layers
):
    params = SegParams(
        True, scale, sigma, layers, min(a, b), max(a, b), rescale, mode, hires, hires_scale, hires_sigma, hires_layers
    )
    # infotext leaves out what has no effect: a mode without rescale, hires values without the override
    shown = replace(params, rescale_mode=mode if rescale else "full")
    if hires != "override":
        shown = replace(shown, hires_scale=3.0, hires_blur_sigma=math.inf, hires_layers="m0")
    assert params_from_infotext(to_infotext(params, hires_fix=True)) == (shown, [])
    assert params_from_args(params.values()) == params
    assert params_from_args({p.name: v for p, v in zip(PARAMS, params.values(), strict=True)}) == params
    # API clients send text too (JSON has no infinity): formatted values parse back exactly.
    as_text = [p.format(v) for p, v in zip(PARAMS, params.values(), strict=True)]
    assert params_from_args(as_text) == params
