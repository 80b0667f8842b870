"""API tier: drives a running WebUI (A1111 or Forge) over HTTP. Skipped unless SEG_WEBUI_URL is set.

    SEG_WEBUI_URL=http://127.0.0.1:7860 pytest tests/api -v

The WebUI must run with ``--api``. Settings (environment):

- ``SEG_REFERENCE_DIR``: where SEG-off reference images live. Run the tier once against a WebUI *without*
  the extension: it records them (every other test is skipped). Then, with the extension, "off" must
  match them pixel for pixel.
- ``SEG_SD15_CHECKPOINT`` / ``SEG_SDXL_CHECKPOINT``: checkpoint titles (as in /sdapi/v1/sd-models) for the
  SD1.5 tests and the SDXL test (skipped when unset). ``SEG_INPAINT_CHECKPOINT``: an inpainting model.
- ``SEG_STEPS`` (default 4) and ``SEG_SIZE`` (default 256) keep CPU runs short.
- ``SEG_API_TITLE``: the ``alwayson_scripts`` key for this extension (default the title; with another
  "Smoothed Energy Guidance" script loaded first, "Smoothed Energy Guidance (sd-webui-seg)").
"""

from __future__ import annotations

import base64
import io
import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

URL = os.environ.get("SEG_WEBUI_URL", "").rstrip("/")
pytestmark = [pytest.mark.webui, pytest.mark.skipif(not URL, reason="set SEG_WEBUI_URL to run the API tier")]

TITLE = os.environ.get("SEG_API_TITLE", "Smoothed Energy Guidance")
STEPS = int(os.environ.get("SEG_STEPS", "4"))
SIZE = int(os.environ.get("SEG_SIZE", "256"))
SD15 = os.environ.get("SEG_SD15_CHECKPOINT")
SDXL = os.environ.get("SEG_SDXL_CHECKPOINT")
INPAINT = os.environ.get("SEG_INPAINT_CHECKPOINT")
REFERENCES = Path(os.environ.get("SEG_REFERENCE_DIR", "/tmp/seg-references"))
SEG_KEYS = ("SEG Scale", "SEG Sigma", "SEG Layers", "SEG Start", "SEG End")


def call(path: str, payload: dict[str, Any] | None = None, timeout: float = 900) -> tuple[int, Any]:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(URL + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def base_payload(**fields: Any) -> dict[str, Any]:
    """The tier's request: one prompt, seed, sampler and the ``SEG_STEPS``/``SEG_SIZE`` size; ``fields`` win."""
    return {
        "prompt": "a lighthouse on a cliff",
        "negative_prompt": "blurry",
        "seed": 1234,
        "steps": STEPS,
        "width": SIZE,
        "height": SIZE,
        "cfg_scale": 5,
        "sampler_name": "Euler",
        **fields,
    }


def generate(kind: str = "txt2img", seg: list[Any] | None = None, **fields: Any) -> dict[str, Any]:
    payload = {
        **base_payload(),
        "override_settings": {"sd_model_checkpoint": SD15} if SD15 else {},
        "override_settings_restore_afterwards": False,
        **fields,
    }
    if seg is not None:
        payload["alwayson_scripts"] = {TITLE: {"args": seg}}
    status, body = call(f"/sdapi/v1/{kind}", payload)
    assert status == 200, body
    body["parsed_info"] = json.loads(body["info"])
    return body


def pixels(image_b64: str) -> bytes:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(image_b64))).convert("RGB").tobytes()


def png_parameters(image_b64: str) -> str:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(image_b64))).info.get("parameters", "")


def extension_loaded() -> bool:
    status, scripts = call("/sdapi/v1/scripts")
    assert status == 200
    return TITLE.lower() in [name.lower() for name in scripts["txt2img"]]


ON = [True, 3.0, "inf", "m0", 0.0, 1.0]
OFF = [False, 3.0, "inf", "m0", 0.0, 1.0]
CASES = {  # name -> request fields, shared by the reference run and the comparison
    "txt2img": {},
    "nonsquare": {"width": SIZE + 64, "height": SIZE - 64},
    "batch2": {"batch_size": 2},
}


@pytest.fixture(scope="session")
def loaded() -> bool:
    return extension_loaded()


@pytest.fixture
def with_extension(loaded: bool) -> None:
    if not loaded:
        pytest.skip("the WebUI runs without the extension (reference run)")


@pytest.mark.parametrize("case", list(CASES))
def test_off_matches_the_webui_without_the_extension(case: str, loaded: bool) -> None:
    path = REFERENCES / f"{case}.json"
    if not loaded:
        body = generate(**CASES[case])
        REFERENCES.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(body["images"]))
        pytest.skip(f"recorded the reference {path}")
    if not path.exists():
        pytest.skip(f"no reference {path}: run this tier once against a WebUI without the extension")
    body = generate(seg=OFF, **CASES[case])
    reference = json.loads(path.read_text())
    assert [pixels(i) for i in body["images"]] == [pixels(i) for i in reference]
    assert not any(key in body["info"] for key in SEG_KEYS)


def test_script_is_offered_on_both_tabs(with_extension: None) -> None:
    status, scripts = call("/sdapi/v1/scripts")
    assert status == 200
    assert TITLE.lower() in [name.lower() for name in scripts["img2img"]]


def test_on_differs_and_writes_infotext(with_extension: None) -> None:
    off = generate(seg=OFF)
    on = generate(seg=ON)
    assert pixels(on["images"][0]) != pixels(off["images"][0])
    text = png_parameters(on["images"][0])
    for key in SEG_KEYS:
        assert key in on["info"]
        assert key in text
    assert "SEG Sigma: inf" in text
    assert not any(key in png_parameters(off["images"][0]) for key in SEG_KEYS)


def test_named_object_form_equals_positional(with_extension: None) -> None:
    positional = generate(seg=[True, 2.0, "4", "m0", 0.0, 1.0])
    named = generate(seg=[{"enabled": True, "scale": 2, "blur_sigma": 4, "layers": "m0"}])
    assert pixels(positional["images"][0]) == pixels(named["images"][0])


def test_png_info_round_trip(with_extension: None) -> None:
    on = generate(seg=[True, 2.5, "16", "m0", 0.0, 1.0])
    status, info = call("/sdapi/v1/png-info", {"image": "data:image/png;base64," + on["images"][0]})
    assert status == 200
    assert info["parameters"]["SEG Scale"] == "2.5"
    assert info["parameters"]["SEG Sigma"] == "16.0"
    assert info["parameters"]["SEG Layers"] == "m0"


def skip_unless_the_infotext_field_works() -> None:
    """Forge and ersatzForge fail a request's ``infotext`` field in their own code (TypeError), SEG or not."""
    status, body = call("/sdapi/v1/txt2img", {"infotext": "a cat\nSteps: 1, Seed: 3", "steps": 1})
    if status != 200:
        pytest.skip(f"this WebUI's API infotext field fails even without SEG: {body}")


def test_api_infotext_field_restores_seg(with_extension: None) -> None:
    skip_unless_the_infotext_field_works()
    on = generate(seg=[True, 2.5, "16", "m0", 0.0, 1.0])
    again = generate(infotext=json.loads(on["info"])["infotexts"][0])
    assert pixels(again["images"][0]) == pixels(on["images"][0])


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ([True, 99], "scale"),
        ([True, 3, "-1"], "blur_sigma"),
        ([True, 3, "inf", "q7"], "layers"),
        ([{"enabled": True, "sigma": 2}], "sigma"),
    ],
)
def test_invalid_arguments_answer_an_http_error_naming_the_field(with_extension: None, args: list, field: str) -> None:
    status, body = call("/sdapi/v1/txt2img", {"prompt": "x", "steps": 1, "alwayson_scripts": {TITLE: {"args": args}}})
    assert status == 422
    assert field in body["detail"]


@pytest.mark.parametrize("case", ["nonsquare", "batch2"])
def test_other_shapes_and_batches(with_extension: None, case: str) -> None:
    off = generate(seg=OFF, **CASES[case])
    on = generate(seg=ON, **CASES[case])
    assert len(on["images"]) == len(off["images"])
    for a, b in zip(on["images"], off["images"], strict=True):
        assert pixels(a) != pixels(b)
    assert "SEG Scale" in on["info"]


def is_forge() -> bool:
    status, options = call("/sdapi/v1/options")
    return status == 200 and "forge_additional_modules" in options


def test_hires_fix(with_extension: None) -> None:
    hires = _hires_fields()
    off = generate(seg=OFF, **hires)
    on = generate(seg=ON, **hires)
    assert pixels(on["images"][0]) != pixels(off["images"][0])
    assert on["parsed_info"]["width"] == off["parsed_info"]["width"]
    assert "SEG Scale" in on["info"]


def _init_image_and_mask() -> tuple[str, str, bytes]:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (SIZE, SIZE), (90, 140, 200))
    ImageDraw.Draw(image).ellipse((40, 40, SIZE - 40, SIZE - 40), fill=(220, 180, 60))
    mask = Image.new("L", (SIZE, SIZE), 0)
    ImageDraw.Draw(mask).rectangle((SIZE // 4, SIZE // 4, 3 * SIZE // 4, 3 * SIZE // 4), fill=255)

    def b64(img: Any) -> str:
        buffer = io.BytesIO()
        img.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode()

    return b64(image), b64(mask), mask.tobytes()


def test_img2img(with_extension: None) -> None:
    init, _, _ = _init_image_and_mask()
    fields = {"init_images": [init], "denoising_strength": 0.75}
    off = generate("img2img", seg=OFF, **fields)
    on = generate("img2img", seg=ON, **fields)
    assert pixels(on["images"][0]) != pixels(off["images"][0])
    assert "SEG Scale" in on["info"]


@pytest.mark.parametrize("checkpoint", [None, INPAINT])
def test_inpaint_outside_mask_unchanged(with_extension: None, checkpoint: str | None) -> None:
    if checkpoint is None and INPAINT is None and SD15 is None:
        pytest.skip("no checkpoint configured")
    init, mask, mask_bytes = _init_image_and_mask()
    fields = {
        "init_images": [init],
        "mask": mask,
        "mask_blur": 0,
        "inpainting_fill": 1,
        "denoising_strength": 0.9,
        "inpaint_full_res": False,
    }
    if checkpoint:
        fields["override_settings"] = {"sd_model_checkpoint": checkpoint}
    off = generate("img2img", seg=OFF, **fields)
    on = generate("img2img", seg=ON, **fields)
    a, b = pixels(on["images"][0]), pixels(off["images"][0])
    assert a != b
    outside = [i for i, m in enumerate(mask_bytes) if m == 0]
    assert all(a[3 * i : 3 * i + 3] == b[3 * i : 3 * i + 3] for i in outside)


def test_sdxl(with_extension: None) -> None:
    if not SDXL:
        pytest.skip("set SEG_SDXL_CHECKPOINT")
    fields = {"override_settings": {"sd_model_checkpoint": SDXL}}
    off = generate(seg=OFF, **fields)
    on = generate(seg=[True, 3.0, "inf", "m0.0-9", 0.0, 1.0], **fields)
    assert pixels(on["images"][0]) != pixels(off["images"][0])
    assert "SEG Layers: m0.0-9" in on["info"]


def _channel_values(image_b64: str) -> list[int]:
    return list(pixels(image_b64))


def _fast_equals_separate(layers: str, checkpoint: str | None, batch: int = 2, sigma: str = "2") -> None:
    """The fast path (A1111: forked in the host's call; Forge: same batch) against the separate extra pass, at
    a scale where SEG visibly moves the pixels: the two may differ only by float rounding."""
    seg = [True, 30.0, sigma, layers, 0.0, 1.0]
    fields = {"batch_size": batch, "override_settings_restore_afterwards": True}

    def run(args: list[Any], fast: bool) -> list[list[int]]:
        settings = {"seg_fast_path": fast, **({"sd_model_checkpoint": checkpoint} if checkpoint else {})}
        body = generate(seg=args, override_settings=settings, **fields)
        return [_channel_values(image) for image in body["images"]]

    fast, separate, off = run(seg, True), run(seg, False), run(OFF, True)
    for f, s, o in zip(fast, separate, off, strict=True):
        rounding = [abs(a - b) for a, b in zip(f, s, strict=True)]
        moved = [abs(a - b) for a, b in zip(f, o, strict=True)]
        assert max(rounding) <= 2
        assert sum(rounding) / len(rounding) < 0.01
        assert sum(moved) / len(moved) > 0.2  # SEG really changed the image, so the match means something


@pytest.mark.parametrize("layers", ["d0,u2", "u1"])
def test_fast_path_makes_the_image_of_the_separate_pass(with_extension: None, layers: str) -> None:
    _fast_equals_separate(layers, SD15)


@pytest.mark.parametrize(
    ("layers", "sigma"), [("u3,u4", "inf"), ("d2,u1", "2")]
)  # (4x4 m0, u0-u2 at 128 px barely move)
def test_sdxl_fast_path_makes_the_image_of_the_separate_pass(with_extension: None, layers: str, sigma: str) -> None:
    if not SDXL:
        pytest.skip("set SEG_SDXL_CHECKPOINT")
    _fast_equals_separate(layers, SDXL, batch=1, sigma=sigma)


# -- rescale and hires fix control (issue 11) ----------------------------------------------------------------
HIRES = {
    "enable_hr": True,
    "hr_scale": 1.5,
    "hr_upscaler": "Latent",
    "hr_second_pass_steps": 2,
    "denoising_strength": 0.6,
}


def _hires_fields() -> dict[str, Any]:
    fields = dict(HIRES)
    if is_forge():  # Forge's API fails a hires request that leaves this out
        fields["hr_additional_modules"] = ["Use same choices"]
    status, modes = call("/sdapi/v1/latent-upscale-modes")
    names = [mode["name"] for mode in modes] if status == 200 else []
    if names and "Latent" not in names:  # ersatzForge names its latent upscalers differently
        fields["hr_upscaler"] = names[0]
    return fields


def test_old_six_positional_arguments_still_work(with_extension: None) -> None:
    six = generate(seg=ON)
    twelve = generate(seg=[*ON, 0.0, "full", "same", 3.0, "inf", "m0"])
    assert pixels(six["images"][0]) == pixels(twelve["images"][0])
    assert "SEG Rescale" not in six["info"]
    assert "SEG Hires" not in six["info"]


def test_hires_override_and_off(with_extension: None) -> None:
    fields = _hires_fields()
    same = generate(seg=ON, **fields)
    override = generate(seg=[*ON, 0.0, "full", "override", 8.0, "2", "u0"], **fields)
    named = generate(
        seg=[{"enabled": True, "hires": "override", "hires_scale": 8, "hires_blur_sigma": 2, "hires_layers": "u0"}],
        **fields,
    )
    off = generate(seg=[*ON, 0.0, "full", "off"], **fields)
    plain = generate(seg=OFF, **fields)
    images = [pixels(body["images"][0]) for body in (same, override, off, plain)]
    assert len(set(images)) == 4  # every hires setting makes its own image
    assert pixels(named["images"][0]) == images[1]
    text = png_parameters(override["images"][0])
    for entry in ("SEG Hires: override", "SEG Hires Scale: 8.0", "SEG Hires Sigma: 2.0", "SEG Hires Layers: u0"):
        assert entry in text
    assert "SEG Hires: off" in off["info"]
    assert "SEG Hires" not in same["info"]
    # without hires fix the hires setting has no effect and is not written
    first_only = generate(seg=[*ON, 0.0, "full", "override", 8.0, "2", "u0"])
    assert pixels(first_only["images"][0]) == pixels(generate(seg=ON)["images"][0])
    assert "SEG Hires" not in first_only["info"]


def test_hires_override_infotext_makes_the_image_again(with_extension: None) -> None:
    skip_unless_the_infotext_field_works()
    fields = _hires_fields()
    override = generate(seg=[*ON, 0.0, "full", "override", 8.0, "2", "u0"], **fields)
    # (A1111's API turns the infotext's implied "Hires sampler: Use same sampler" into an invalid sampler name)
    again = generate(infotext=json.loads(override["info"])["infotexts"][0], hr_sampler_name="Euler", **fields)
    assert pixels(again["images"][0]) == pixels(override["images"][0])


@pytest.mark.parametrize("cfg", [5.0, 1.0])
def test_rescale_modes(with_extension: None, cfg: float) -> None:
    plain = generate(seg=ON, cfg_scale=cfg)
    zero = generate(seg=[*ON, 0.0, "snf"], cfg_scale=cfg)
    assert pixels(zero["images"][0]) == pixels(plain["images"][0])  # rescale 0 = plain SEG, bit for bit
    assert "SEG Rescale" not in zero["info"]
    seen = {pixels(plain["images"][0])}
    for mode in ("full", "partial", "snf"):
        body = generate(seg=[True, 12.0, "inf", "m0", 0.0, 1.0, 1.0, mode], cfg_scale=cfg)
        assert f"SEG Rescale: 1.0, SEG Rescale Mode: {mode}" in png_parameters(body["images"][0])
        seen.add(pixels(body["images"][0]))
    assert len(seen) >= 3  # at CFG 1 full and partial coincide (the CFG result is cond)


def test_rescale_with_and_prompts_and_a_batch(with_extension: None) -> None:
    fields = {"prompt": "a lighthouse AND a cliff :0.6", "batch_size": 2}
    plain = generate(seg=ON, **fields)
    rescaled = generate(seg=[*ON, 0.7, "partial"], **fields)
    assert len(rescaled["images"]) == 2
    for a, b in zip(rescaled["images"], plain["images"], strict=True):
        assert pixels(a) != pixels(b)


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ([*ON, 1.5], "rescale"),
        ([*ON, 0.5, "half"], "rescale_mode"),
        ([*ON, 0.0, "full", "maybe"], "hires"),
        ([*ON, 0.0, "full", "override", 99], "hires_scale"),
        ([{"enabled": True, "hires_layers": "q1"}], "hires_layers"),
    ],
)
def test_invalid_new_fields_answer_422_naming_them(with_extension: None, args: list, field: str) -> None:
    status, body = call("/sdapi/v1/txt2img", {"prompt": "x", "steps": 1, "alwayson_scripts": {TITLE: {"args": args}}})
    assert status == 422
    assert f"({field})" in body["detail"]


def test_pasted_incantations_infotext_enables_the_equivalent_settings(with_extension: None) -> None:
    skip_unless_the_infotext_field_works()
    incantations = "SEG Active: True, SEG Blur Sigma: 3.0, SEG Start Step: 1, SEG End Step: 150"
    text = f"a lighthouse on a cliff\nNegative prompt: blurry\nSteps: {STEPS}, {incantations}"
    pasted = generate(infotext=text)
    start = 1 / (STEPS - 1)
    explicit = generate(seg=[True, 3.0, "8.0", "m0", start, 1.0])
    assert pixels(pasted["images"][0]) == pixels(explicit["images"][0])
    assert "SEG Sigma: 8.0" in pasted["info"]


@pytest.mark.usefixtures("with_extension")
def test_xyz_axis_over_blur_sigma():
    """A 2x1 XYZ grid over "[SEG] Blur sigma": both cells run with SEG, each infotext with its own sigma.
    Needs the test-only probe extension (tests/api/seg_probe) for the axis' index in the X type dropdown."""
    status, labels = call("/seg-probe/xyz-labels")
    if status != 200 or not labels:
        pytest.skip("no probe extension (tests/api/seg_probe) or no XYZ script")
    if "[SEG] Blur sigma" not in labels:
        pytest.skip("this API-only WebUI built the XYZ axis list before before_ui callbacks ran (start it with its UI)")
    status, info = call("/sdapi/v1/script-info")
    assert status == 200
    xyz = next(s for s in info if s["name"] == "x/y/z plot" and not s["is_img2img"])
    args = [arg["value"] for arg in xyz["args"]]
    names = [arg["label"] for arg in xyz["args"]]
    for axis in ("X type", "Y type", "Z type"):  # index dropdowns: script-info gives their labels
        args[names.index(axis)] = labels.index(args[names.index(axis)])
    args[names.index("X type")] = labels.index("[SEG] Blur sigma")
    args[names.index("X values")] = "2, inf"
    args[names.index("Include Sub Images")] = True  # each cell's image and infotext, not the grid's alone
    body = generate(script_name="x/y/z plot", script_args=args)
    sigmas = [
        text.split("SEG Sigma: ")[1].split(",")[0] for text in body["parsed_info"]["infotexts"] if "SEG Sigma" in text
    ]
    assert sorted(set(sigmas)) == ["2.0", "inf"], body["parsed_info"]["infotexts"]
