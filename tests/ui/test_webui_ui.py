"""SEG as a person meets it, in a real browser: one test per thing a person does (see tests/ui/conftest.py).

Each test leaves screenshots of its steps in ``$SEG_UI_SHOTS/<test>/``. Values read back from the page are
what the page shows: the infotext under the image, the controls after a paste, the console line.
"""

from __future__ import annotations

import base64
import io
import os
import re
import tempfile
import time
from pathlib import Path

import pytest

from seg_lib.core.params import BY_INFOTEXT, PARAMS
from seg_lib.core.paste import seg_from_infotext
from tests.ui.webui import WebUI, infotext_fields

TXT = "txt2img"
IMG = "img2img"
SEG_KEYS = ("SEG Scale", "SEG Sigma", "SEG Layers", "SEG Start", "SEG End")
# The console lines of the separate pass with Fast SEG off: seg_lib/host/a1111_paths.py (plain_path, "the fast SEG
# setting is off") and seg_lib/host/forge.py (why_separate "fast path off in Settings").
SEPARATE_PASS = re.compile(
    r"\[SEG\] separate extra UNet (pass per step \(the fast SEG setting is off\)|call \(fast path off in Settings\))"
)


def _seg_fields(infotext: str) -> dict[str, str]:
    return {key: value for key, value in infotext_fields(infotext).items() if key.startswith("SEG ")}


def _id(ui: WebUI, tab: str, name: str) -> str:
    return ui.seg_id(tab, name)


def _set_seg(ui: WebUI, tab: str, *, scale: float, sigma: str, layers: str) -> None:
    ui.set_number(_id(ui, tab, "scale"), scale, "the SEG scale slider")
    ui.set_dropdown(_id(ui, tab, "blur_sigma"), sigma, "the SEG blur sigma box")
    ui.set_text(_id(ui, tab, "layers"), layers, "the SEG layers box")


def test_txt2img_accordion_and_infotext(webui: WebUI, size: int, steps: int):
    ui = webui
    accordion = ui.seg(TXT, "enabled", "the SEG accordion")
    header = accordion.locator(".label-wrap").first
    assert "Smoothed Energy Guidance" in header.inner_text()
    ui.shot("accordion-closed", accordion)
    assert not ui.accordion_open(TXT), "the SEG accordion is open on a fresh page"
    assert not ui.seg_enabled(TXT), "SEG is on on a fresh page"
    assert not ui.seg_checkbox(TXT).is_checked()
    ui.small_image(TXT, size, steps)
    ui.open_accordion(TXT)
    ui.enable_seg(TXT)
    assert ui.accordion_open(TXT)
    _set_seg(ui, TXT, scale=2.5, sigma="4", layers="d0, m0")
    ui.shot("accordion-set", accordion)
    seg = _seg_fields(ui.generate(TXT))
    ui.shot("generated-sigma-4")
    assert seg.get("SEG Scale") == "2.5", seg
    assert seg.get("SEG Sigma") == "4.0", seg
    assert seg.get("SEG Layers") == "d0,m0", seg
    assert (seg.get("SEG Start"), seg.get("SEG End")) == ("0.0", "1.0"), seg

    ui.set_dropdown(_id(ui, TXT, "blur_sigma"), "inf", "the SEG blur sigma box")
    seg = _seg_fields(ui.generate(TXT))
    ui.shot("generated-sigma-inf")
    assert seg.get("SEG Sigma") == "inf", seg
    assert seg.get("SEG Scale") == "2.5", seg


def _reveal_every_control(ui: WebUI) -> None:
    """Rescale above 0 and Hires fix with override, so that every SEG control is on the page."""
    ui.enable_seg(TXT)
    ui.set_number(_id(ui, TXT, "rescale"), 0.5, "the SEG rescale slider")
    ui.seg(TXT, "rescale_mode", "the rescale mode (shown once rescale is above 0)")
    hires_box = ui.find("#txt2img_hr-visible-checkbox", "the Hires fix checkbox")
    if not hires_box.is_checked():
        hires_box.check()
    ui.seg(TXT, "hires", "the SEG hires mode (shown with Hires fix on)")
    ui.set_dropdown(_id(ui, TXT, "hires"), "override", "the SEG hires mode")
    for name in ("hires_scale", "hires_blur_sigma", "hires_layers"):
        ui.seg(TXT, name, f"the SEG {name} control (shown with override)")


def test_tooltips_on_hover(webui: WebUI):
    ui = webui
    _reveal_every_control(ui)
    ui.shot("every-control")
    missing = []
    for param in PARAMS:
        element = ui.seg(TXT, param.name)
        target = element.locator(".label-wrap").first if param.name == "enabled" else element
        target.hover()
        title = target.evaluate("e => (e.closest('[title]') || {}).title || ''")
        if title != param.help:
            missing.append(f"{param.name}: {title!r}")
    ui.shot("hovered-last")
    assert not missing, f"controls without their tooltip: {missing}"


def test_controls_shown_when_they_matter(webui: WebUI):
    ui = webui
    ui.enable_seg(TXT)
    names = ("rescale_mode", "hires")
    hidden = {name: not ui.page.locator(f"#{_id(ui, TXT, name)}").first.is_visible() for name in names}
    ui.shot("defaults")
    assert hidden == {"rescale_mode": True, "hires": True}, f"shown before they matter: {hidden}"
    ui.set_number(_id(ui, TXT, "rescale"), 0.3, "the SEG rescale slider")
    ui.seg(TXT, "rescale_mode", "the rescale mode after rescale 0.3")
    ui.set_number(_id(ui, TXT, "rescale"), 0, "the SEG rescale slider")
    ui.find(f"#{_id(ui, TXT, 'rescale_mode')}", "the rescale mode, hidden at rescale 0", state="hidden")
    ui.find("#txt2img_hr-visible-checkbox", "the Hires fix checkbox").check()
    ui.seg(TXT, "hires", "the SEG hires mode with Hires fix on")
    ui.find(f"#{_id(ui, TXT, 'hires_scale')}", "the hires scale while the mode is 'same'", state="hidden")
    ui.shot("hires-on")
    ui.find("#txt2img_hr-visible-checkbox", "the Hires fix checkbox").uncheck()
    ui.find(f"#{_id(ui, TXT, 'hires')}", "the SEG hires mode with Hires fix off", state="hidden")
    # img2img has no hires pass: its SEG accordion never shows the hires controls
    ui.tab("img2img")
    ui.enable_seg(IMG)
    ui.shot("img2img")
    assert not ui.page.locator(f"#{_id(ui, IMG, 'hires')}").first.is_visible()


def _focused_control(ui: WebUI, tab: str) -> str | None:
    """The SEG control (its name) holding the keyboard focus, if any."""
    prefix = _id(ui, tab, "")
    holder = ui.page.evaluate(
        "prefix => { let e = document.activeElement; while (e && e.shadowRoot && e.shadowRoot.activeElement)"
        " e = e.shadowRoot.activeElement; let h = e; while (h && !(h.id && h.id.startsWith(prefix)"
        " && !h.id.endsWith('-checkbox'))) h = h.parentElement; return h ? h.id : null; }",
        prefix,
    )
    return holder.removeprefix(prefix) if holder else None


def test_keyboard_reaches_every_control(webui: WebUI):
    ui = webui
    box = ui.seg_checkbox(TXT)
    box.focus()
    ui.page.keyboard.press("Space")
    ui.page.wait_for_timeout(500)
    assert ui.seg_enabled(TXT), "Space on the focused SEG checkbox did not turn SEG on"
    if not ui.accordion_open(TXT):  # the header's checkbox alone does not open it (the hosts' InputAccordion)
        ui.page.keyboard.press("Shift+Tab")
        assert _focused_control(ui, TXT) == "enabled", "Shift+Tab from the SEG checkbox left the accordion header"
        ui.page.keyboard.press("Enter")
        ui.page.wait_for_timeout(500)
        assert ui.accordion_open(TXT), "Enter on the focused SEG accordion header did not open it"
        ui.page.keyboard.press("Tab")  # back onto the checkbox
    ui.shot("on-from-keyboard")
    reached: list[str] = []
    shown = [param.name for param in PARAMS[1:] if ui.page.locator(f"#{_id(ui, TXT, param.name)}").first.is_visible()]
    for _ in range(6 * len(shown)):
        ui.page.keyboard.press("Tab")
        name = _focused_control(ui, TXT)
        if name in shown and name not in reached:
            reached.append(name)
    ui.shot("tabbed")
    assert reached == shown, f"Tab reached {reached} of {shown} (in this order)"


@pytest.mark.parametrize("case", ["sigma", "layers", "scale"])
def test_invalid_input_is_named_and_claims_nothing(webui: WebUI, size: int, steps: int, case: str):
    ui = webui
    ui.small_image(TXT, size, steps)
    ui.enable_seg(TXT)
    if case == "sigma":
        ui.set_dropdown(_id(ui, TXT, "blur_sigma"), "abc", "the SEG blur sigma box")
        named = "blur sigma"
    elif case == "layers":
        ui.set_text(_id(ui, TXT, "layers"), "q9", "the SEG layers box")
        named = "layers"
    else:
        ui.set_number(_id(ui, TXT, "scale"), -2, "the SEG scale slider")
        named = "scale"
    # the accordion's message (seg_lib/ui.py) or, for a slider the host clamps, the note beside it (seg_tooltips.js)
    where = f"#{_id(ui, TXT, 'message')}" if case != "scale" else f"#{_id(ui, TXT, 'scale')} .seg-range-note"
    message = ui.find(where, "SEG's message about the invalid value")
    ui.shot("message", ui.seg(TXT, "enabled"))
    assert named in message.inner_text().lower(), message.inner_text()
    infotext = ui.generate(TXT)
    ui.shot("generated")
    seg = _seg_fields(infotext)
    # Whatever the image claims must be in range: every SEG value it carries reads back through the table.
    for key, value in seg.items():
        BY_INFOTEXT[key].check(value)
    if case == "scale":  # the slider's range holds: the image was made with the clamped value
        assert seg.get("SEG Scale") == "0.0", seg
    else:  # SEG was off for the image, said under it
        assert not seg, f"the image claims SEG with an invalid {named}: {seg}"
        assert named in ui.comments(TXT).lower(), f"no comment under the image naming {named}: {ui.comments(TXT)!r}"


def _init_png(size: int) -> Path:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (90, 140, 200))
    ImageDraw.Draw(image).ellipse((size // 6, size // 6, 5 * size // 6, 5 * size // 6), fill=(220, 180, 60))
    path = Path(tempfile.mkdtemp(prefix="seg-ui-")) / "init.png"
    image.save(path)
    return path


def test_img2img_with_seg(webui: WebUI, size: int, steps: int):
    ui = webui
    ui.tab("img2img")
    ui.sub_tab("#mode_img2img", "img2img")
    ui.upload_image("img2img", _init_png(size))
    ui.small_image(IMG, size, steps)
    ui.enable_seg(IMG)
    _set_seg(ui, IMG, scale=4, sigma="10", layers="m0")
    ui.shot("set")
    seg = _seg_fields(ui.generate(IMG))
    ui.shot("generated")
    assert (seg.get("SEG Scale"), seg.get("SEG Sigma"), seg.get("SEG Layers")) == ("4.0", "10.0", "m0"), seg


def test_inpaint_with_drawn_mask(webui: WebUI, size: int, steps: int):
    ui = webui
    canvas = ui.open_inpaint(_init_png(size))
    ui.draw_mask(canvas)
    ui.small_image(IMG, size, steps)
    ui.enable_seg(IMG)
    _set_seg(ui, IMG, scale=3, sigma="inf", layers="u0")
    ui.shot("masked")
    infotext = ui.generate(IMG)
    ui.shot("generated")
    seg = _seg_fields(infotext)
    assert (seg.get("SEG Sigma"), seg.get("SEG Layers")) == ("inf", "u0"), seg
    assert "Mask blur" in infotext, f"the run was not an inpaint run: {infotext}"


# -- PNG Info and "Send to" -----------------------------------------------------------------------------------
def _png_with(parameters: str, size: int = 64) -> Path:
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    path = Path(tempfile.mkdtemp(prefix="seg-ui-")) / "pasted.png"
    Image.new("RGB", (size, size), (120, 60, 30)).save(path, pnginfo=info)
    return path


def _seg_png(ui: WebUI, size: int, steps: int) -> tuple[Path, str]:
    """A PNG whose parameters are those of a real SEG generation (made through the API, for speed)."""
    body = ui.api(
        "/sdapi/v1/txt2img",
        {
            "prompt": "a red fox in the snow",
            "steps": steps,
            "width": size,
            "height": size,
            "seed": 7,
            "alwayson_scripts": {
                "Smoothed Energy Guidance": {
                    "args": [{"enabled": True, "scale": 4.5, "blur_sigma": 16, "layers": "d1,u2", "rescale": 0.25}]
                }
            },
        },
    )
    import json

    infotext = json.loads(body["info"])["infotexts"][0]
    assert "SEG Scale: 4.5" in infotext, f"the API's SEG image lacks its keys: {infotext}"
    from PIL import Image

    image = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    path = _png_with(infotext, image.width)
    return path, infotext


def _expect_controls(ui: WebUI, tab: str, infotext: str) -> None:
    """The SEG controls hold what the text's SEG settings are (seg_from_infotext: the table's reading)."""
    params, _notes = seg_from_infotext(infotext_fields(infotext))
    assert params.enabled
    assert ui.seg_enabled(tab), f"SEG is not on in {tab} after the paste"
    wrong = []
    for param in PARAMS[1:]:
        if param.name.startswith("hires"):
            continue  # no hires fix in these texts: those controls keep their defaults and stay hidden
        shown = ui.value_of(_id(ui, tab, param.name))
        expected = getattr(params, param.name)
        if param.numeric:
            same = abs(float(shown) - float(expected)) < 0.006
        elif "sigma" in param.name:
            same = param.check(shown) == expected
        else:
            same = param.check(shown) == expected
        if not same:
            wrong.append(f"{param.name}: shows {shown!r}, expected {param.format(expected)}")
    assert not wrong, f"{tab} after the paste: {wrong}"


def _send(ui: WebUI, png: Path, target: str) -> str:
    """PNG Info: drop the PNG, read its parameters, click "Send to <target>"; returns the text shown."""
    ui.tab("PNG Info")
    ui.upload_image("pnginfo", png)
    shown = ui.find("#tab_pnginfo", "the PNG Info tab")
    deadline = time.monotonic() + 30
    while "Steps:" not in shown.inner_text() and time.monotonic() < deadline:
        ui.page.wait_for_timeout(300)
    assert "Steps:" in shown.inner_text(), "PNG Info shows no parameters for the PNG"
    ui.shot("pnginfo")
    ui.find(f"#tab_pnginfo #{target}_tab", f'PNG Info\'s "Send to {target}" button').click()
    ui.page.wait_for_timeout(2500)
    ui.shot(f"sent-to-{target}")
    return shown.inner_text()


def test_png_info_send_restores_seg(webui: WebUI, size: int, steps: int):
    ui = webui
    png, infotext = _seg_png(ui, size, steps)
    for target, tab in (("txt2img", TXT), ("img2img", IMG)):
        _send(ui, png, target)
        _expect_controls(ui, tab, infotext)
        ui.shot(f"{tab}-controls", ui.seg(tab, "enabled"))


def test_png_info_without_seg_turns_it_off(webui: WebUI):
    ui = webui
    ui.enable_seg(TXT)
    png = _png_with("a red fox\nNegative prompt: blurry\nSteps: 2, Sampler: Euler, CFG scale: 5, Seed: 1, Size: 64x64")
    _send(ui, png, "txt2img")
    assert not ui.seg_enabled(TXT), "pasting parameters without SEG left SEG on"
    assert not ui.seg_checkbox(TXT).is_checked()


PAMPARAMM = (
    "a red fox\nSteps: 20, Sampler: Euler, CFG scale: 5, Seed: 1, Size: 64x64, seg_enabled: True, seg_scale: 2.5, "
    'seg_blur_sigma: -1, seg_block_list: "d1,u2", seg_rescale: 0.5, seg_rescale_mode: partial'
)
INCANTATIONS = (
    "a red fox\nSteps: 20, Sampler: Euler, CFG scale: 5, Seed: 1, Size: 64x64, SEG Active: True, "
    "SEG Blur Sigma: 2, SEG Start Step: 0, SEG End Step: 9"
)


@pytest.mark.parametrize(
    ("maker", "text", "expected"),
    [
        ("pamparamm", PAMPARAMM, {"scale": "2.5", "blur_sigma": "inf", "layers": "d1,u2", "rescale_mode": "partial"}),
        ("incantations", INCANTATIONS, {"scale": "3", "blur_sigma": "4", "layers": "m0"}),
    ],
)
def test_png_info_from_other_seg_extensions(webui: WebUI, maker: str, text: str, expected: dict[str, str]):
    ui = webui
    _send(ui, _png_with(text), "txt2img")
    ui.open_accordion(TXT)
    ui.shot(f"{maker}-controls", ui.seg(TXT, "enabled"))
    _expect_controls(ui, TXT, text)
    for name, value in expected.items():  # the README's conversion table, read by hand
        shown = ui.value_of(_id(ui, TXT, name))
        if name in ("scale", "blur_sigma") and value != "inf":
            assert float(shown) == float(value), f"{maker} {name}: {shown}"
        else:
            assert shown.replace(" ", "") == value, f"{maker} {name}: {shown}"


# -- XYZ plot ---------------------------------------------------------------------------------------------------
def test_xyz_plot_over_blur_sigma(webui: WebUI, size: int, steps: int):
    ui = webui
    ui.small_image(TXT, size, steps)
    ui.choose_script(TXT, "X/Y/Z plot")
    x_type = f"script_{TXT}_xyz_plot_x_type"
    listed = [label for label in ui.dropdown_choices(x_type) if label.startswith("[SEG] ")]
    ui.shot("x-types")
    assert listed == [f"[SEG] {param.label}" for param in PARAMS], listed
    ui.set_dropdown(x_type, "[SEG] Blur sigma", "the X type dropdown")
    ui.set_text(f"script_{TXT}_xyz_plot_x_values", "1, inf", "the X values box")
    lone = ui.find(f"#script_{TXT}_xyz_plot_include_lone_images input", "XYZ's Include Sub Images")
    if not lone.is_checked():
        lone.check()
    ui.shot("xyz-set")
    ui.generate(TXT)
    ui.shot("grid")
    cells = []
    thumbs = ui.gallery_images(TXT)
    count = thumbs.count()
    assert count >= 3, f"the gallery holds {count} images; a 2x1 grid with its cells has 3"
    for index in range(count):
        thumbs.nth(index).dispatch_event("click")  # the open preview lies over the thumbnails
        ui.page.wait_for_timeout(800)
        text = ui.page.locator(f"#html_info_{TXT}").first.inner_text()
        seg = _seg_fields(text)
        if seg:
            cells.append(seg.get("SEG Sigma"))
    ui.shot("cell")
    assert sorted(set(cells)) == ["1.0", "inf"], f"the cells' SEG Sigma: {cells}"


# -- Settings ----------------------------------------------------------------------------------------------------
def test_fast_seg_setting_takes_the_separate_pass(webui: WebUI, size: int, steps: int):
    log_path = os.environ.get("SEG_WEBUI_LOG")
    assert log_path, "set SEG_WEBUI_LOG to the WebUI's console log: this test reads SEG's console line"
    ui = webui
    box = ui.open_setting("seg_fast_path", "Fast SEG")
    assert box.is_checked(), "Fast SEG is off before the test"
    try:
        box.uncheck()
        ui.apply_settings()
        ui.open()  # a fresh page shows what the WebUI stored
        assert not ui.open_setting("seg_fast_path", "Fast SEG").is_checked(), "Apply settings did not keep Fast SEG off"
        ui.tab("txt2img")
        ui.small_image(TXT, size, steps)
        ui.enable_seg(TXT)
        start = Path(log_path).stat().st_size
        seg = _seg_fields(ui.generate(TXT))
        assert seg.get("SEG Scale"), f"the image does not claim SEG: {seg}"
        with open(log_path, "rb") as log:
            log.seek(start)
            lines = log.read().decode(errors="replace")
        assert SEPARATE_PASS.search(lines), f"no separate-pass line in the console:\n{lines[-3000:]}"
    finally:
        # Restored through the API, whatever state the page is in (some hosts' GET /options omit the key).
        ui.api("/sdapi/v1/options", {"seg_fast_path": True})


# -- Hires fix ---------------------------------------------------------------------------------------------------
def test_hires_override_writes_the_hires_keys(webui: WebUI, size: int, steps: int):
    ui = webui
    ui.small_image(TXT, size, steps)
    ui.enable_seg(TXT)
    ui.find(f"#{_id(ui, TXT, 'hires')}", "the SEG hires mode before Hires fix", state="hidden")
    ui.enable_hires_fix(steps=1, scale=1.5)
    ui.seg(TXT, "hires", "the SEG hires mode with Hires fix on")
    ui.set_dropdown(_id(ui, TXT, "hires"), "override", "the SEG hires mode")
    ui.set_number(_id(ui, TXT, "hires_scale"), 2, "the SEG hires scale slider")
    ui.set_dropdown(_id(ui, TXT, "hires_blur_sigma"), "2", "the SEG hires blur sigma box")
    ui.set_text(_id(ui, TXT, "hires_layers"), "u0", "the SEG hires layers box")
    ui.shot("override", ui.seg(TXT, "enabled"))
    seg = _seg_fields(ui.generate(TXT))
    ui.shot("generated")
    assert seg.get("SEG Hires") == "override", seg
    assert (seg.get("SEG Hires Scale"), seg.get("SEG Hires Sigma"), seg.get("SEG Hires Layers")) == (
        "2.0",
        "2.0",
        "u0",
    ), seg
