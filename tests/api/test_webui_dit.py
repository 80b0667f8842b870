"""API tier, DiT models: the families a running Forge-family WebUI has, from the lab's DiT manifest
(``tests/api/make_dit_models.py --out DIR`` writes DIR/manifest.json). Skipped unless SEG_WEBUI_URL and
SEG_DIT_MANIFEST are set.

    SEG_WEBUI_URL=http://127.0.0.1:7875 SEG_DIT_MANIFEST=DIR/manifest.json SEG_DIT_HOST=ersatz \
        pytest tests/api/test_webui_dit.py

``SEG_DIT_HOST`` (``forge`` or ``ersatz``) picks the families the manifest lists for that WebUI;
``SEG_DIT_FAMILIES`` (comma-separated) narrows them. References: as the UNet tier, run once against the
WebUI without the extension (``SEG_REFERENCE_DIR``); then "off" must match them pixel for pixel.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from tests.api.test_webui_api import REFERENCES, SEG_KEYS, TITLE, URL, call, pixels, png_parameters

MANIFEST = os.environ.get("SEG_DIT_MANIFEST", "")
HOST = os.environ.get("SEG_DIT_HOST", "")
pytestmark = [
    pytest.mark.webui,
    pytest.mark.skipif(not (URL and MANIFEST), reason="set SEG_WEBUI_URL and SEG_DIT_MANIFEST to run the DiT tier"),
]


def _families() -> dict[str, dict[str, Any]]:
    if not MANIFEST:
        return {}
    families = json.loads(Path(MANIFEST).read_text())["families"]
    wanted = [name for name in os.environ.get("SEG_DIT_FAMILIES", "").split(",") if name]
    return {
        name: family
        for name, family in families.items()
        if (not HOST or HOST in family["hosts"]) and (not wanted or name in wanted)
    }


FAMILIES = _families()
# The blocks each lab model has (random weights, few blocks): a selection per kind it has.
LAYERS = {"sd35": "joint1", "flux": "double1", "flux-schnell": "single0", "chroma": "double1"}
SIZES = {"square": {}, "nonsquare": {"width": 320, "height": 192}}


def _generate(family: str, seg: list[Any] | dict[str, Any] | None, **fields: Any) -> dict[str, Any]:
    request = json.loads(json.dumps(FAMILIES[family]["request"]))
    settings = {**request.pop("override_settings", {}), **fields.pop("override_settings", {})}
    payload = {
        "prompt": "a red fox in the snow",
        "negative_prompt": "blurry",
        "seed": 1234,
        **request,
        "override_settings": settings,
        **fields,
    }
    if seg is not None:
        payload["alwayson_scripts"] = {TITLE: {"args": seg if isinstance(seg, list) else [seg]}}
    status, body = call("/sdapi/v1/txt2img", payload)
    assert status == 200, body
    return body


def _on(family: str, **fields: Any) -> dict[str, Any]:
    return {"enabled": True, "scale": 3.0, "blur_sigma": "inf", "layers": LAYERS.get(family, "m0"), **fields}


OFF = {"enabled": False}


@pytest.fixture(scope="module")
def loaded() -> bool:
    status, scripts = call("/sdapi/v1/scripts")
    assert status == 200
    return TITLE.lower() in [name.lower() for name in scripts["txt2img"]]


@pytest.fixture
def with_extension(loaded: bool) -> None:
    if not loaded:
        pytest.skip("the WebUI runs without the extension (reference run)")


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_off_matches_the_webui_without_the_extension(family: str, size: str, loaded: bool) -> None:
    path = REFERENCES / f"dit-{family}-{size}.json"
    if not loaded:
        body = _generate(family, None, **SIZES[size])
        REFERENCES.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(body["images"]))
        pytest.skip(f"recorded the reference {path}")
    if not path.exists():
        pytest.skip(f"no reference {path}: run this tier once against the WebUI without the extension")
    body = _generate(family, OFF, **SIZES[size])
    assert [pixels(i) for i in body["images"]] == [pixels(i) for i in json.loads(path.read_text())]
    assert not any(key in body["info"] for key in SEG_KEYS)


@pytest.mark.usefixtures("with_extension")
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_on_changes_the_image_and_says_so(family: str, size: str) -> None:
    off = _generate(family, OFF, **SIZES[size])
    on = _generate(family, _on(family), **SIZES[size])
    assert pixels(on["images"][0]) != pixels(off["images"][0])
    text = png_parameters(on["images"][0])
    assert f"SEG Layers: {LAYERS[family]}" in text
    assert "SEG Scale: 3" in text
    # PNG Info reads it back as SEG's settings (the paste fields)
    status, info = call("/sdapi/v1/png-info", {"image": "data:image/png;base64," + on["images"][0]})
    assert status == 200
    assert LAYERS[family] in info["info"]


def _channels(body: dict[str, Any]) -> list[list[int]]:
    return [list(pixels(image)) for image in body["images"]]


@pytest.mark.usefixtures("with_extension")
@pytest.mark.parametrize("sigma", ["inf", "2"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_fast_path_makes_the_image_of_the_separate_pass(family: str, sigma: str) -> None:
    """The smoothed rows forked in the host's own call against a separate cond call: float rounding apart,
    the same image, at a scale where SEG moves the pixels."""
    seg = _on(family, scale=30.0, blur_sigma=sigma)

    def run(args: dict[str, Any], fast: bool) -> list[list[int]]:
        body = _generate(
            family, args, override_settings={"seg_fast_path": fast}, override_settings_restore_afterwards=True
        )
        return _channels(body)

    fast, separate, off = run(seg, True), run(seg, False), run(OFF, True)
    for f, s, o in zip(fast, separate, off, strict=True):
        rounding = [abs(a - b) for a, b in zip(f, s, strict=True)]
        moved = [abs(a - b) for a, b in zip(f, o, strict=True)]
        assert max(rounding) <= 2
        assert sum(moved) / len(moved) > 0.2


@pytest.mark.usefixtures("with_extension")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_block_the_model_lacks_makes_the_image_without_seg(family: str) -> None:
    off = _generate(family, OFF)
    body = _generate(family, _on(family, layers="joint99" if family == "sd35" else "single99"))
    assert pixels(body["images"][0]) == pixels(off["images"][0])
    assert not any(key in body["info"] for key in SEG_KEYS)


@pytest.mark.usefixtures("with_extension")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_bad_block_list_answers_422_naming_the_field(family: str) -> None:
    payload = {
        "prompt": "x",
        "steps": 1,
        "alwayson_scripts": {TITLE: {"args": [{"enabled": True, "layers": "joint7-"}]}},
    }
    status, body = call("/sdapi/v1/txt2img", payload)
    assert status == 422
    assert "(layers)" in body["detail"]


@pytest.mark.usefixtures("with_extension")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_batch_of_two(family: str) -> None:
    off = _generate(family, OFF, batch_size=2)
    on = _generate(family, _on(family), batch_size=2)
    assert len(on["images"]) == 2
    for a, b in zip(on["images"], off["images"], strict=True):
        assert pixels(a) != pixels(b)
    assert "SEG Layers" in on["info"]


@pytest.mark.usefixtures("with_extension")
@pytest.mark.parametrize("family", list(FAMILIES))
def test_hires_fix(family: str) -> None:
    status, modes = call("/sdapi/v1/latent-upscale-modes")
    assert status == 200
    names = [mode["name"] for mode in modes]  # ersatzForge: "Latent (antialiased)", ...; the others: "Latent"
    hires = {
        "enable_hr": True,
        "hr_scale": 1.5,
        "hr_upscaler": "Latent" if "Latent" in names else names[0],
        "denoising_strength": 0.6,
        "hr_second_pass_steps": 2,
        "hr_additional_modules": ["Use same choices"],
    }
    off = _generate(family, OFF, **hires)
    on = _generate(family, _on(family), **hires)
    assert pixels(on["images"][0]) != pixels(off["images"][0])
    assert "SEG Layers" in on["info"]


@pytest.mark.usefixtures("with_extension")
@pytest.mark.parametrize("mask", [False, True])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_img2img_and_inpaint(family: str, mask: bool) -> None:
    """img2img and inpainting on a DiT: SEG changes the image, and outside an inpainting mask the SEG image
    differs from the SEG-off one no more than the host's own inpainting does between two SEG-off runs."""
    from tests.api.test_webui_api import _init_image_and_mask

    init, mask_b64, _ = _init_image_and_mask()
    request = json.loads(json.dumps(FAMILIES[family]["request"]))
    fields = {
        "init_images": [init],
        "denoising_strength": 0.7,
        **({"mask": mask_b64, "inpainting_fill": 1, "inpaint_full_res": False} if mask else {}),
    }

    def img2img(seg: dict[str, Any]) -> dict[str, Any]:
        payload = {"prompt": "a red fox in the snow", "seed": 1234, **request, **fields}
        payload["alwayson_scripts"] = {TITLE: {"args": [seg]}}
        status, body = call("/sdapi/v1/img2img", payload)
        assert status == 200, body
        return body

    off, on = img2img(OFF), img2img(_on(family))
    assert pixels(on["images"][0]) != pixels(off["images"][0])
    assert "SEG Layers" in on["info"]
