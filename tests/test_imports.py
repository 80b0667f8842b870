"""Infotext of the other SEG extensions (pamparamm's Forge/ComfyUI one, v0xie's incantations) as our settings."""

from __future__ import annotations

import itertools
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seg_lib.api import prepare_request
from seg_lib.core.guidance import in_step_window
from seg_lib.core.imports import schedule, sigma_window, step_fraction
from seg_lib.core.params import SegParams
from seg_lib.core.paste import imported_infotext, normalize_pasted, parse_params_line, seg_from_infotext

# What pamparamm's scripts/seg.py writes (extra_generation_params; the WebUI writes them as text).
PAMPARAMM = {
    "Steps": "20",
    "seg_enabled": "True",
    "seg_scale": "2.5",
    "seg_rescale": "0.4",
    "seg_rescale_mode": "partial",
    "seg_blur_sigma": "-1.0",
    "seg_block": "middle",
    "seg_block_id": "0",
    "seg_block_list": "",
}
PAMPARAMM_HIRES = {
    "seg_hr_override": "True",
    "seg_hr_cfg": "4.5",
    "seg_hr_scale": "5.0",
    "seg_hr_rescale": "0.4",
    "seg_hr_rescale_mode": "partial",
    "seg_hr_blur_sigma": "12.0",
}


# -- pamparamm -------------------------------------------------------------------------------------------------
def test_pamparamm_settings():
    params, notes = seg_from_infotext(PAMPARAMM)
    assert params == SegParams(True, 2.5, math.inf, "middle0", rescale=0.4, rescale_mode="partial")
    assert notes == []


def test_pamparamm_snf_applies_whatever_its_rescale_so_it_is_our_rescale_one():
    params, _ = seg_from_infotext({**PAMPARAMM, "seg_rescale": "0.0", "seg_rescale_mode": "snf"})
    assert (params.rescale, params.rescale_mode) == (1.0, "snf")
    params, _ = seg_from_infotext({**PAMPARAMM, "seg_rescale": "0.0", "seg_rescale_mode": "full"})
    assert params.rescale == 0.0


def test_pamparamm_hires_override_and_its_cfg_on_the_hosts_field():
    fields = {**PAMPARAMM, **PAMPARAMM_HIRES, "seg_block_list": "d2,m0"}
    params, notes = seg_from_infotext(fields)
    assert (params.hires, params.hires_scale, params.hires_blur_sigma) == ("override", 5.0, 12.0)
    assert params.hires_layers == params.layers == "d2,m0"  # its hires pass keeps the first pass's blocks
    pasted = dict(fields)
    normalize_pasted(pasted)
    assert pasted["Hires CFG Scale"] == "4.5"
    assert pasted["SEG Hires"] == "override"
    assert pasted["SEG Hires Layers"] == "d2,m0"
    assert any("Hires CFG Scale" in note for note in notes)
    own = {**fields, "Hires CFG Scale": "6"}  # the host wrote its own: it stays
    normalize_pasted(own)
    assert own["Hires CFG Scale"] == "6"


def test_pamparamm_hires_rescale_that_differs_is_reported():
    fields = {**PAMPARAMM, **PAMPARAMM_HIRES, "seg_hr_rescale": "0.9"}
    _, notes = seg_from_infotext(fields)
    assert any("seg_hr_rescale" in note for note in notes)
    _, notes = seg_from_infotext({**PAMPARAMM, **PAMPARAMM_HIRES})
    assert not any("seg_hr_rescale" in note for note in notes)


def test_pamparamm_hires_override_off_is_same():
    params, _ = seg_from_infotext({**PAMPARAMM, "seg_hr_override": "False"})
    assert params.hires == "same"


def test_pamparamm_sigma_window_is_converted_with_a_note():
    fields = {**PAMPARAMM, "seg_sigma_start": "-1.0", "seg_sigma_end": "1.0"}
    params, notes = seg_from_infotext(fields)
    sigmas = schedule(20, karras=False)
    last = max(i for i, s in enumerate(sigmas) if s > 1.0)
    assert (params.start, params.end) == (0.0, last / 19)
    assert len(notes) == 1
    assert "approximation" in notes[0]
    karras, _ = seg_from_infotext({**fields, "Schedule type": "Karras"})
    assert karras.end != params.end  # the Karras schedule spends more steps at low noise
    none, notes = seg_from_infotext({**PAMPARAMM, "seg_sigma_start": "0.01", "seg_sigma_end": "0.001"})
    assert not none.enabled
    assert "SEG off" in notes[-1]


def test_schedules_span_the_sd_noise_levels():
    for karras in (False, True):
        sigmas = schedule(12, karras)
        assert math.isclose(sigmas[0], 14.6146, rel_tol=1e-4)
        assert math.isclose(sigmas[-1], 0.0292, rel_tol=1e-2)
        assert all(a > b for a, b in itertools.pairwise(sigmas))


@given(
    steps=st.integers(2, 60),
    top=st.one_of(st.just(-1.0), st.floats(0.05, 20)),
    bottom=st.one_of(st.just(-1.0), st.floats(0.0, 15)),
    karras=st.booleans(),
)
@settings(max_examples=200, deadline=None)
def test_sigma_window_selects_exactly_the_steps_inside(steps, top, bottom, karras):
    sigmas = schedule(steps, karras)
    inside = [bottom < s <= (math.inf if top < 0 else top) for s in sigmas]
    window = sigma_window(top, bottom, sigmas)
    if window is None:
        assert not any(inside)
        return
    assert [in_step_window(i, steps, *window) for i in range(steps)] == inside


# -- incantations -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("exponent", "sigma"),
    [("0.5", 2**0.5), ("3", 8.0), ("10", 1024.0), ("10.5", 2**10.5), ("10.6", math.inf), ("11.0", math.inf)],
)
def test_incantations_blur_sigma_is_an_exponent(exponent, sigma):
    params, notes = seg_from_infotext({"SEG Active": "True", "SEG Blur Sigma": exponent})
    assert params == SegParams(True, 3.0, sigma, "m0")
    assert notes[-1].startswith("incantations' SEG guided differently")


@given(steps=st.integers(1, 80), first=st.integers(0, 150), last=st.integers(0, 150))
@settings(max_examples=300, deadline=None)
def test_incantations_step_window_runs_on_the_same_steps(steps, first, last):
    fields = {"SEG Active": "True", "SEG Blur Sigma": "3", "Steps": str(steps)}
    params, notes = seg_from_infotext({**fields, "SEG Start Step": str(first), "SEG End Step": str(last)})
    theirs = [first <= step <= last for step in range(steps)]
    if not any(theirs):
        assert not params.enabled
        assert "SEG off" in notes[-1]
        return
    assert [in_step_window(step, steps, params.start, params.end) for step in range(steps)] == theirs


def test_incantations_without_steps_assumes_the_default_and_says_so():
    params, notes = seg_from_infotext({"SEG Active": "True", "SEG Start Step": "2", "SEG End Step": "150"})
    assert (params.start, params.end) == (step_fraction(2, 20), 1.0)
    assert "assumes 20 steps" in notes[0]


def test_incantations_paste_fills_our_controls_and_says_once_that_it_differs():
    fields = {"Steps": "12", "SEG Active": "True", "SEG Blur Sigma": "11", "SEG Start Step": "0", "SEG End Step": "5"}
    notes = normalize_pasted(fields)
    assert fields["SEG Scale"] == "3.0"
    assert fields["SEG Sigma"] == "inf"
    assert fields["SEG Layers"] == "m0"
    assert (fields["SEG Start"], fields["SEG End"]) == ("0.0", repr(5 / 11))
    assert sum("guided differently" in note for note in notes) == 1


def test_our_keys_win_over_imported_ones():
    params, notes = seg_from_infotext({"SEG Scale": "1.5", "SEG Active": "True", "SEG Blur Sigma": "3", **PAMPARAMM})
    assert params == SegParams(True, 1.5)
    assert notes == []


# -- the API's infotext field (the host parses it without the paste callback) ------------------------------------
def test_api_infotext_of_another_extension_gets_our_keys(capsys):
    text = (
        "a cat\nNegative prompt: dog\nSteps: 12, Sampler: Euler, seg_enabled: True, seg_scale: 2.5, "
        'seg_blur_sigma: -1.0, seg_block: middle, seg_block_id: 0, seg_block_list: "d0,m0", '
        "seg_hr_override: True, seg_hr_cfg: 4.0, seg_hr_scale: 5.0, seg_hr_blur_sigma: 2.0"
    )
    body, error = prepare_request(json.dumps({"prompt": "x", "infotext": text}).encode(), "Smoothed Energy Guidance")
    assert error is None
    converted = json.loads(body)["infotext"]
    assert converted.startswith(text)
    fields = parse_params_line(converted.split("\n")[-1])
    assert fields["SEG Layers"] == "d0,m0"  # quoted in the text: it has a comma
    assert (fields["SEG Scale"], fields["SEG Sigma"], fields["SEG Hires"]) == ("2.5", "inf", "override")
    assert fields["Hires CFG Scale"] == "4.0"
    assert seg_from_infotext(fields)[0] == seg_from_infotext(parse_params_line(text.split("\n")[-1]))[0]
    assert "[SEG] infotext: seg_hr_cfg" in capsys.readouterr().out


def test_api_infotext_with_our_keys_or_none_is_left_alone():
    ours = "a cat\nSteps: 12, SEG Scale: 2.0, SEG Sigma: inf, SEG Layers: m0, SEG Start: 0.0, SEG End: 1.0"
    assert imported_infotext(ours) == (None, [])
    assert imported_infotext("a cat\nSteps: 12, Sampler: Euler, CFG scale: 5") == (None, [])
    body, error = prepare_request(json.dumps({"prompt": "x", "infotext": ours}).encode(), "Smoothed Energy Guidance")
    assert (body, error) == (None, None)
