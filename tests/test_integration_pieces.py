"""Host-agnostic glue: UNet layout reading, per-generation settings, paste, XYZ axes, the API guard."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
from torch import nn

from seg_lib.api import check_request
from seg_lib.core.blocks import SD1_LAYOUT, SDXL_LAYOUT
from seg_lib.core.params import SegParams, to_infotext
from seg_lib.core.paste import normalize_pasted, seg_from_infotext
from seg_lib.families.unet import attn1_module, read_layout
from seg_lib.generation import params_for_generation, script_args_to_params
from seg_lib.host import detect_host
from seg_lib.host.run import Run
from seg_lib.xyz import OVERRIDES_ATTRIBUTE, register_axes
from tests.guard_driver import through_guard
from tests.standins import SpatialTransformer, make_p

TITLE = "Smoothed Energy Guidance"


# -- layout --------------------------------------------------------------------------------------------
class Downsample(nn.Module):
    pass


class Upsample(nn.Module):
    pass


def _block(*parts: str, depth: int = 1) -> nn.Sequential:
    layers = {"R": nn.Identity, "S": lambda: SpatialTransformer(4, depth), "D": Downsample, "U": Upsample}
    return nn.Sequential(*(layers[part]() for part in parts))


def _skeleton(inputs, middle_depth, outputs) -> nn.Module:
    unet = nn.Module()
    unet.input_blocks = nn.ModuleList(_block(*spec[0], depth=spec[1]) for spec in inputs)
    unet.middle_block = _block("R", "S", "R", depth=middle_depth)
    unet.output_blocks = nn.ModuleList(_block(*spec[0], depth=spec[1]) for spec in outputs)
    return unet


def test_layout_of_sd1_structure():
    # ldm v1-inference: attention_resolutions [4, 2, 1], channel_mult [1, 2, 4, 4], depth 1.
    rs, r = (("R", "S"), 1), (("R",), 1)
    inputs = [(("R",), 1), rs, rs, (("D",), 1), rs, rs, (("D",), 1), rs, rs, (("D",), 1), r, r]
    outputs = [r, r, (("R", "U"), 1), rs, rs, (("R", "S", "U"), 1), rs, rs, (("R", "S", "U"), 1), rs, rs, rs]
    assert read_layout(_skeleton(inputs, 1, outputs)) == SD1_LAYOUT


def test_layout_of_sdxl_structure():
    # sgm sd_xl_base: channel_mult [1, 2, 4], attention_resolutions [4, 2], transformer_depth [1, 2, 10].
    r = (("R",), 1)
    inputs = [r, r, r, (("D",), 1), (("R", "S"), 2), (("R", "S"), 2), (("D",), 1), (("R", "S"), 10), (("R", "S"), 10)]
    outputs = [(("R", "S"), 10), (("R", "S"), 10), (("R", "S", "U"), 10), (("R", "S"), 2), (("R", "S"), 2)]
    outputs += [(("R", "S", "U"), 2), r, r, r]
    unet = _skeleton(inputs, 10, outputs)
    assert read_layout(unet) == SDXL_LAYOUT
    block = next(m for m in unet.middle_block if isinstance(m, SpatialTransformer))
    from seg_lib.core.blocks import LayerRef

    assert attn1_module(unet, LayerRef("middle", 0, 9, 2)) is block.transformer_blocks[9].attn1


def test_no_host_is_detected_in_tests():
    assert detect_host() == "none"


# -- per-generation settings ------------------------------------------------------------------------------
def test_generation_writes_infotext_only_once_a_step_was_guided():
    p = make_p()
    p.extra_generation_params.update({"SEG Scale": "9.0", "Steps": 20})  # left by an earlier XYZ cell
    assert params_for_generation(p, [False, 3.0, "inf", "m0", 0.0, 1.0]) == SegParams()
    assert p.extra_generation_params == {"Steps": 20}
    params = params_for_generation(p, [True, 2.0, "10", "d0,m0", 0.0, 0.8])
    assert params == SegParams(True, 2.0, 10.0, "d0,m0", 0.0, 0.8)
    assert p.extra_generation_params == {"Steps": 20}  # nothing claimed before SEG ran
    run = Run(p, params)
    run.begin_batch()
    run.note_guided()
    assert p.extra_generation_params == {"Steps": 20, **to_infotext(params)}
    run.begin_batch()  # the next batch of the generation claims SEG again only once it is guided
    assert p.extra_generation_params == {"Steps": 20}


def test_xyz_cell_overrides_win_and_imply_enabled():
    p = make_p()
    setattr(p, OVERRIDES_ATTRIBUTE, {"blur_sigma": "4", "enabled": True})
    assert params_for_generation(p, [False, 3.0, "inf", "m0", 0.0, 1.0]) == SegParams(True, blur_sigma=4.0)


def test_invalid_ui_values_switch_seg_off_with_one_line(capsys):
    p = make_p()
    assert params_for_generation(p, [True, 3.0, "-2", "m0", 0.0, 1.0]) == SegParams()
    assert p.extra_generation_params == {}
    assert "SEG is off for this generation: SEG blur sigma (blur_sigma)" in capsys.readouterr().out


def test_api_object_form_in_the_script_slice():
    # The host fills the slots after the object with UI defaults.
    args = [{"enabled": True, "blur_sigma": "inf", "layers": "m0"}, 3.0, "inf", "m0", 0.0, 1.0]
    assert script_args_to_params(args) == SegParams(enabled=True)


# -- paste -------------------------------------------------------------------------------------------------
def test_paste_without_seg_turns_it_off():
    fields = {"Steps": "20"}
    assert normalize_pasted(fields) == []
    assert fields == {"Steps": "20", "SEG Scale": "False"}


def test_paste_round_trip_of_our_keys():
    params = SegParams(True, 2.5, 16.0, "d0-d3,m0", 0.1, 0.9)
    fields = dict(to_infotext(params))
    assert normalize_pasted(fields) == []
    # the settings written only when not default get their default, so their controls are reset too
    defaults = {"SEG Rescale": "0.0", "SEG Rescale Mode": "full", "SEG Hires": "same", "SEG Hires Scale": "3.0"}
    assert fields == {**to_infotext(params), **defaults, "SEG Hires Sigma": "inf", "SEG Hires Layers": "m0"}
    assert seg_from_infotext(fields) == (params, [])
    hires = SegParams(True, rescale=0.5, rescale_mode="snf", hires="override", hires_scale=6.0, hires_layers="u0")
    fields = dict(to_infotext(hires, hires_fix=True))
    assert normalize_pasted(fields) == []
    assert fields == to_infotext(hires, hires_fix=True)
    assert seg_from_infotext(fields) == (hires, [])


def test_paste_skips_malformed_values_with_a_warning():
    fields = {"SEG Scale": "2", "SEG Sigma": "banana", "SEG Layers": "m0"}
    warnings = normalize_pasted(fields)
    assert len(warnings) == 1
    assert "SEG Sigma" in warnings[0]
    assert {key: fields[key] for key in ("SEG Scale", "SEG Layers")} == {"SEG Scale": "2.0", "SEG Layers": "m0"}
    assert "SEG Sigma" not in fields  # its control keeps its value
    assert fields["SEG Rescale"] == "0.0"  # absent optional settings go back to their default


def test_paste_of_the_forge_comfyui_extension_keys():
    legacy = {
        "seg_enabled": "True",
        "seg_scale": "2.0",
        "seg_blur_sigma": "-1.0",
        "seg_block": "middle",
        "seg_block_id": "0",
        "seg_block_list": "",
    }
    params, notes = seg_from_infotext(legacy)
    assert params == SegParams(True, 2.0, math.inf, "middle0", 0.0, 1.0)
    assert notes == []
    listed = {**legacy, "seg_blur_sigma": "10", "seg_block_list": "d2.2-9,m0", "seg_sigma_start": "5"}
    params, notes = seg_from_infotext(listed)
    assert (params.blur_sigma, params.layers) == (10.0, "d2.2-9,m0")
    assert "assumes 20 steps" in notes[0]
    assert "(noise levels)" in notes[1]
    assert "approximation" in notes[1]
    assert seg_from_infotext({**legacy, "seg_enabled": "False"})[0] == SegParams()
    fields = dict(legacy)
    normalize_pasted(fields)
    assert fields["SEG Scale"] == "2.0"
    assert fields["SEG Layers"] == "middle0"


# -- XYZ ---------------------------------------------------------------------------------------------------
class AxisOption:
    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply, self.confirm, self.choices = label, type, apply, confirm, choices


def _fake_xyz(monkeypatch) -> SimpleNamespace:
    module = SimpleNamespace(
        axis_options=[AxisOption("Nothing", str, None)],
        AxisOption=AxisOption,
        boolean_choice=lambda reverse=False: lambda: ["False", "True"] if reverse else ["True", "False"],
    )
    data = SimpleNamespace(script_class=type("Script", (), {"__module__": "xyz_grid.py"}), module=module)
    monkeypatch.setitem(
        __import__("sys").modules, "modules", SimpleNamespace(scripts=SimpleNamespace(scripts_data=[data]))
    )
    return module


def test_xyz_axes_registered_once_in_table_order(monkeypatch):
    module = _fake_xyz(monkeypatch)
    assert register_axes()
    assert register_axes()
    labels = [option.label for option in module.axis_options]
    assert labels == [
        "Nothing",
        "[SEG] Enabled",
        "[SEG] Scale",
        "[SEG] Blur sigma",
        "[SEG] Layers",
        "[SEG] Start",
        "[SEG] End",
        "[SEG] Rescale",
        "[SEG] Rescale mode",
        "[SEG] Hires fix",
        "[SEG] Hires scale",
        "[SEG] Hires blur sigma",
        "[SEG] Hires layers",
    ]
    by_label = {option.label: option for option in module.axis_options}
    assert by_label["[SEG] Scale"].type is float
    assert by_label["[SEG] Blur sigma"].type is str
    assert by_label["[SEG] Rescale"].type is float
    assert by_label["[SEG] Rescale mode"].choices() == ["full", "partial", "snf"]
    assert by_label["[SEG] Hires fix"].choices() == ["same", "off", "override"]
    # an axis over a hires override value means "override" in its cells, unless a Hires fix axis says otherwise
    cell = make_p()
    by_label["[SEG] Hires scale"].apply(cell, 6.0, None)
    assert getattr(cell, OVERRIDES_ATTRIBUTE) == {"hires_scale": 6.0, "enabled": True, "hires": "override"}
    cell = make_p()
    by_label["[SEG] Hires fix"].apply(cell, "off", None)
    by_label["[SEG] Hires layers"].apply(cell, "u0", None)
    assert getattr(cell, OVERRIDES_ATTRIBUTE)["hires"] == "off"
    with pytest.raises(ValueError, match=r"SEG rescale mode \(rescale_mode\)"):
        by_label["[SEG] Rescale mode"].confirm(cell, ["full", "half"])
    p = make_p()
    by_label["[SEG] Blur sigma"].apply(p, "inf", None)
    by_label["[SEG] Scale"].apply(p, 5.0, None)
    assert getattr(p, OVERRIDES_ATTRIBUTE) == {"blur_sigma": "inf", "enabled": True, "scale": 5.0}
    with pytest.raises(ValueError, match="blur sigma"):
        by_label["[SEG] Blur sigma"].confirm(p, ["1", "-3"])
    # An explicit "[SEG] Enabled" value wins over the one a SEG setting axis implies, in either order.
    for first, second in (("[SEG] Enabled", "[SEG] Blur sigma"), ("[SEG] Blur sigma", "[SEG] Enabled")):
        cell = make_p()
        by_label[first].apply(cell, "False" if first == "[SEG] Enabled" else "4", None)
        by_label[second].apply(cell, "False" if second == "[SEG] Enabled" else "4", None)
        assert getattr(cell, OVERRIDES_ATTRIBUTE) == {"enabled": "False", "blur_sigma": "4"}
        assert not params_for_generation(cell, [True]).enabled
        assert cell.extra_generation_params == {}


# -- API guard -----------------------------------------------------------------------------------------------
def _body(args) -> bytes:
    return json.dumps({"prompt": "x", "alwayson_scripts": {"smoothed energy guidance": {"args": args}}}).encode()


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ([True, 3, "inf", "m0", 0, 1], None),
        ([{"enabled": True, "blur_sigma": "inf"}], None),
        ([True, 99], "SEG scale (scale)"),
        ([{"enabled": True, "blur_sigma": -1}], "SEG blur sigma (blur_sigma)"),
        ([{"enabled": True, "sigma": 3}], "unknown argument(s) sigma"),
        ([{"enabled": True}, 3], "list of one object"),
        ({"enabled": True}, '"args" must be a list'),
        ([True, 3, "inf", "x9"], "SEG layers (layers)"),
    ],
)
def test_check_request(args, error):
    found = check_request(_body(args), TITLE)
    if error is None:
        assert found is None
    else:
        assert error in found


def test_check_request_ignores_other_requests():
    assert check_request(b"not json", TITLE) is None
    assert check_request(json.dumps({"prompt": "x"}).encode(), TITLE) is None
    assert check_request(json.dumps({"alwayson_scripts": {"Other": {"args": [1]}}}).encode(), TITLE) is None


def _call(path: str, body: bytes) -> tuple[list[dict], list[bytes]]:
    return through_guard([body[:10], body[10:]], path, TITLE)


def test_guard_answers_422_naming_the_field_and_passes_valid_requests_untouched():
    bad = _body([True, 3, "inf", "m0", 0.9, 0.1])
    sent, seen = _call("/sdapi/v1/txt2img", bad)
    assert seen == []
    assert sent[0]["status"] == 422
    assert "SEG start (start) must not be after SEG end (end)" in json.loads(sent[1]["body"])["detail"]
    good = _body([True, 3, "inf", "m0", 0.1, 0.9])
    sent, seen = _call("/sdapi/v1/img2img", good)
    assert seen == [good]
    assert sent[0]["status"] == 200
    sent, seen = _call("/sdapi/v1/options", bad)  # other endpoints are not inspected
    assert seen == [bad]
