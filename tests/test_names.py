"""Another script titled "Smoothed Energy Guidance": detection over a stand-in script list, and the API alias."""

from __future__ import annotations

import json

import pytest

from seg_lib.api import prepare_request
from seg_lib.names import ALIAS, TITLE, api_title, clash_message, same_titled
from tests.guard_driver import through_guard

OURS = object()  # our script class, as the stand-in list holds it
PAMPARAMM = ("Smoothed Energy Guidance", "pamparamm", "extensions/sd-perturbed-attention/scripts/seg.py")
INCANTATIONS = ("smoothed energy guidance", "incantations", "extensions/sd-webui-incantations/scripts/seg.py")
OTHER = ("XYZ plot", "xyz", "scripts/xyz_grid.py")


def _ours(where: str = "extensions/sd-webui-seg/scripts/seg.py") -> tuple:
    return (TITLE, OURS, where)


@pytest.mark.parametrize(
    ("scripts", "others", "first", "title"),
    [
        ([OTHER, _ours()], [], True, TITLE),
        ([_ours(), PAMPARAMM], [PAMPARAMM[2]], True, TITLE),
        ([PAMPARAMM, _ours()], [PAMPARAMM[2]], False, ALIAS),
        ([OTHER, INCANTATIONS, _ours(), PAMPARAMM], [INCANTATIONS[2], PAMPARAMM[2]], False, ALIAS),
    ],
)
def test_same_titled_scripts_are_found_in_load_order(scripts, others, first, title):
    assert same_titled(scripts, OURS) == (others, first)
    assert api_title(scripts, OURS) == title


def test_the_startup_line_names_the_other_script_and_the_alias():
    message = clash_message([PAMPARAMM[2]], first=False)
    assert PAMPARAMM[2] in message
    assert "reach the other one" in message
    assert ALIAS in message


def _request(entries: dict) -> bytes:
    return json.dumps({"prompt": "x", "alwayson_scripts": entries}).encode()


def test_alias_is_renamed_when_the_plain_title_reaches_us():
    body, error = prepare_request(_request({ALIAS: {"args": [True, 2.0]}}), TITLE)
    assert error is None
    assert json.loads(body)["alwayson_scripts"] == {TITLE: {"args": [True, 2.0]}}
    body, error = prepare_request(_request({ALIAS.upper(): {"args": [True, 99]}}), TITLE)
    assert "SEG scale (scale)" in error
    body, error = prepare_request(_request({ALIAS: {"args": [True]}, TITLE: {"args": [True]}}), TITLE)
    assert body is None
    assert "send one of them" in error


def test_when_another_script_owns_the_plain_title_its_entry_is_left_alone():
    theirs = [True, 3.0, 0.0, "full", -1.0, "middle", 0, "", False, 7.0, 3.0, 0.0, "full", -1.0, -1.0, -1.0]
    body, error = prepare_request(_request({TITLE: {"args": theirs}, ALIAS: {"args": [True, 2.0]}}), ALIAS)
    assert (body, error) == (None, None)  # the host finds us under the alias itself
    body, error = prepare_request(_request({TITLE: {"args": theirs}, ALIAS: {"args": [True, "x"]}}), ALIAS)
    assert "SEG scale (scale)" in error


def test_the_guard_passes_the_renamed_body_on():
    body = _request({ALIAS: {"args": [True, 2.0]}})
    sent, seen = through_guard([body[:10], body[10:]], "/sdapi/v1/txt2img", lambda: TITLE)
    assert sent[0]["status"] == 200
    assert json.loads(seen[0])["alwayson_scripts"] == {TITLE: {"args": [True, 2.0]}}
