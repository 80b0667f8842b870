"""Drive a WebUI's page as a person would: the one place that knows how gradio 3 (A1111) and gradio 4 (the
Forges) lay out the controls SEG uses and the WebUI's own ones around them.

Elements are found by the ids ``seg_lib/ui.py`` gives SEG's controls (``Script.elem_id``) and by the WebUIs'
own ids; a missing element fails the test with its name and selector, and a screenshot of the page.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any, ClassVar

# The script's title, as Script.elem_id spells it; the alias when pamparamm's extension holds the plain title.
TITLE_SLUGS = ("smoothed_energy_guidance", "smoothed_energy_guidance_sdwebuiseg")
WAIT_MS = 20_000
GENERATION_S = float(600)
INFOTEXT_PAIR = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


class NotFound(AssertionError):
    """An element the test needed is not on the page."""


def http_json(url: str, payload: Any = None, timeout: float = 600) -> Any:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read() or b"null")


def gradio_major(url: str) -> int:
    """3 (A1111) or 4 (the Forges): gradio's own /config names its version."""
    version = str(http_json(f"{url}/config").get("version", "4"))
    return int(version.split(".")[0])


def infotext_fields(text: str) -> dict[str, str]:
    """``key: value`` pairs of an infotext's parameters line (the last line with "Steps:")."""
    lines = [line for line in text.splitlines() if "Steps:" in line]
    if not lines:
        return {}
    fields = {}
    for key, value in INFOTEXT_PAIR.findall(lines[-1]):
        if value.startswith('"') and value.endswith('"') and len(value) > 1:
            value = json.loads(value)
        fields[key.strip()] = value.strip()
    return fields


class WebUI:
    """One browser page on the WebUI, with the helpers the tests share."""

    def __init__(self, page: Any, url: str, shots: Path, test_name: str, major: int) -> None:
        self.page = page
        self.url = url
        self.shots = shots
        self.test_name = test_name
        self.major = major
        self.slug = TITLE_SLUGS[0]
        self._shot_index = 0

    # -- finding things -------------------------------------------------------------------------------------
    def find(self, selector: str, what: str, timeout_ms: int = WAIT_MS, state: str = "visible") -> Any:
        """The first element matching ``selector`` once it is in ``state``; else the test fails naming it."""
        locator = self.page.locator(selector).first
        try:
            locator.wait_for(state=state, timeout=timeout_ms)
        except Exception as error:
            self.shot(f"missing-{re.sub(r'[^a-z0-9]+', '-', what.lower())}")
            raise NotFound(f"could not find {what} ({selector}, {state}) on {self.page.url}") from error
        return locator

    def seg_id(self, tab: str, name: str) -> str:
        return f"script_{tab}_{self.slug}_{name}"

    def seg(self, tab: str, name: str, what: str | None = None, state: str = "visible") -> Any:
        """A SEG control's wrapper (its elem_id from seg_lib/ui.py)."""
        return self.find(f"#{self.seg_id(tab, name)}", what or f"the SEG {name} control in {tab}", state=state)

    def shot(self, step: str, element: Any = None) -> Path:
        """A screenshot of this step (the whole page, or one element), numbered in the order taken."""
        self._shot_index += 1
        path = self.shots / self.test_name / f"{self._shot_index:02d}-{step}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            (element or self.page).screenshot(path=str(path), **({} if element else {"full_page": False}))
        except Exception as error:  # a screenshot must not hide the failure it documents
            path.with_suffix(".txt").write_text(f"screenshot failed: {error!r}\n")
        return path

    # -- the page -------------------------------------------------------------------------------------------
    def open(self) -> None:
        self.page.goto(self.url, wait_until="domcontentloaded", timeout=120_000)
        self.find("#txt2img_generate", "the txt2img Generate button", timeout_ms=120_000)
        for slug in TITLE_SLUGS:
            if self.page.locator(f"#script_txt2img_{slug}_enabled").count():
                self.slug = slug
                break
        self.find(f"#{self.seg_id('txt2img', 'enabled')}", "the SEG accordion in txt2img")
        # onUiLoaded has run once the tooltips are on (javascript/seg_tooltips.js); wait for it.
        self.page.wait_for_function(
            "id => { const e = document.querySelector('gradio-app') || document;"
            " const root = e.shadowRoot || e; const x = root.querySelector('#' + id); return x && x.title; }",
            arg=self.seg_id("txt2img", "scale"),
            timeout=60_000,
        )

    # The tab buttons of one tab group, not of the groups inside it: gradio 3 puts them in ``.tab-nav``,
    # gradio 4.40 in a ``[role=tablist]`` (and may move those that do not fit into an overflow menu).
    _TAB_BUTTON = """([groupSelector, name]) => {
        const root = gradioApp();
        const group = root.querySelector(groupSelector);
        if (!group) return null;
        const home = group.classList.contains('tabs') ? group : group.querySelector('.tabs') || group;
        for (const button of group.querySelectorAll('button')) {
            if (button.closest('.tabs') !== home) continue;
            const inNav = button.parentElement.classList.contains('tab-nav') || button.getAttribute('role') === 'tab'
                || !!button.closest('.overflow-dropdown');
            if (inNav && button.textContent.trim().toLowerCase() === name.toLowerCase()) return button;
        }
        return null;
    }"""

    def _click_tab(self, group: str, name: str) -> None:
        handle = self.page.evaluate_handle(self._TAB_BUTTON, [group, name]).as_element()
        if handle is None:
            self.shot(f"missing-tab-{name}")
            raise NotFound(f"could not find the tab {name!r} in {group} (its .tab-nav or [role=tablist] buttons)")
        if not handle.is_visible():  # in gradio 4's overflow menu: open it first
            self.page.locator(f"{group} .overflow-menu button, {group} .overflow-item-selected").first.click()
        handle.click()
        self.page.wait_for_timeout(500)

    def tab(self, name: str) -> None:
        """Switch to a top tab (txt2img, img2img, PNG Info, Settings) by its button text (any case: ersatzForge
        writes "Txt2img")."""
        self._click_tab("#tabs", name)

    def sub_tab(self, container: str, name: str) -> None:
        """A tab inside a tab group (img2img's "img2img"/"Inpaint") by its button text."""
        self._click_tab(container, name)

    # -- the SEG accordion ---------------------------------------------------------------------------------
    def accordion_open(self, tab: str) -> bool:
        header = self.seg(tab, "enabled").locator(".label-wrap").first
        return "open" in (header.get_attribute("class") or "")

    def seg_checkbox(self, tab: str) -> Any:
        """The checkbox a person sees in the accordion's header (A1111's inputAccordion.js adds it)."""
        return self.find(f"#{self.seg_id(tab, 'enabled')}-visible-checkbox", f"the SEG checkbox in {tab}")

    def seg_enabled(self, tab: str) -> bool:
        """The value the generation gets: the hidden gradio checkbox behind the header's."""
        hidden = self.page.locator(f"#{self.seg_id(tab, 'enabled')}-checkbox input").first
        return bool(hidden.is_checked())

    def open_accordion(self, tab: str) -> None:
        if not self.accordion_open(tab):
            self.seg(tab, "enabled").locator(".label-wrap").first.click()
            self.page.wait_for_timeout(300)

    def enable_seg(self, tab: str) -> None:
        """Open the accordion and make sure its checkbox is ticked (opening ticks it while they are linked)."""
        self.open_accordion(tab)
        box = self.seg_checkbox(tab)
        if not box.is_checked():
            box.check()
        self.page.wait_for_timeout(300)
        assert self.seg_enabled(tab), f"ticking the SEG checkbox in {tab} did not turn SEG on"

    def number_input(self, element_id: str, what: str) -> Any:
        return self.find(f"#{element_id} input[type=number]", f"the number box of {what}")

    def set_number(self, element_id: str, value: float | str, what: str) -> None:
        """Type into a slider's number box and leave it, as a person does."""
        box = self.number_input(element_id, what)
        box.fill(str(value))
        box.press("Tab")
        self.page.wait_for_timeout(300)

    def text_input(self, element_id: str, what: str) -> Any:
        selector = f"#{element_id} textarea, #{element_id} input[type=text], #{element_id} input:not([type])"
        return self.find(selector, what)

    def set_text(self, element_id: str, value: str, what: str) -> None:
        box = self.text_input(element_id, what)
        box.fill(value)
        box.press("Tab")
        self.page.wait_for_timeout(300)

    def set_dropdown(self, element_id: str, value: str, what: str) -> None:
        """Type a value into a dropdown (choice or custom) and commit it with Enter, then leave it."""
        box = self.find(f"#{element_id} input", f"the text box of {what}")
        box.click()
        box.fill(value)
        self.page.wait_for_timeout(200)
        box.press("Enter")
        self.page.wait_for_timeout(200)
        self.page.keyboard.press("Escape")
        box.blur()
        self.page.wait_for_timeout(300)

    def dropdown_value(self, element_id: str) -> str:
        box = self.page.locator(f"#{element_id} input").first
        value = box.input_value()
        if value:
            return value
        # gradio 3's single-choice dropdown shows the value as the input's value too; keep a fallback
        return self.page.locator(f"#{element_id} .single-select, #{element_id} .token").first.inner_text()

    def value_of(self, element_id: str) -> str:
        """What a SEG control shows: a slider's number, a text box's text, a dropdown's value."""
        box = self.page.locator(f"#{element_id} input[type=number]")
        if box.count():
            return box.first.input_value()
        text = self.page.locator(f"#{element_id} textarea, #{element_id} input[type=text]")
        if text.count() and not self.page.locator(f"#{element_id} .wrap-inner, #{element_id} .secondary-wrap").count():
            return text.first.input_value()
        return self.dropdown_value(element_id)

    # -- the WebUI's own controls ---------------------------------------------------------------------------
    IMAGE_INPUTS: ClassVar[dict[str, str]] = {
        "img2img": "img2img_image",
        "inpaint": "img2maskimg",
        "pnginfo": "pnginfo_image",
    }

    def upload_image(self, where: str, path: Path) -> None:
        """Put a PNG into an image input: gradio's upload (A1111, reForge, Classic) or Forge's canvas."""
        element_id = self.IMAGE_INPUTS[where]
        self.find(f"#{element_id}", f"the {where} image input")
        file_input = self.page.locator(f"#{element_id} input[type=file]").first
        if not file_input.count():
            self.shot(f"missing-upload-{where}")
            raise NotFound(f"could not find the file input of the {where} image (#{element_id} input[type=file])")
        file_input.set_input_files(str(path))
        self.page.wait_for_timeout(1500)

    def open_inpaint(self, image: Path) -> str:
        """img2img's inpaint mode with ``image`` in it; returns the id of the canvas to paint the mask on.
        A1111, reForge, Classic and Forge have an "Inpaint" tab; ersatzForge paints on img2img's own canvas,
        with its "inpaint" method chosen."""
        self.tab("img2img")
        has_tab = self.page.evaluate_handle(self._TAB_BUTTON, ["#mode_img2img", "Inpaint"]).as_element()
        if has_tab is not None:
            self.sub_tab("#mode_img2img", "Inpaint")
            self.upload_image("inpaint", image)
            return "img2maskimg"
        self.sub_tab("#mode_img2img", "img2img")
        self.upload_image("img2img", image)
        method = self.page.locator("#img2img_img2img_tab").get_by_role("radio", name="inpaint", exact=True)
        try:
            method.check(timeout=WAIT_MS)
        except Exception as error:
            self.shot("missing-inpaint-method")
            raise NotFound("no Inpaint tab and no 'inpaint' method under img2img's canvas") from error
        return "img2img_image"

    def draw_mask(self, element_id: str) -> None:
        """Drag the mouse across the middle of the inpaint image, as a person paints a mask."""
        canvases = self.page.locator(f"#{element_id} canvas")
        if not canvases.count():
            self.shot("missing-mask-canvas")
            raise NotFound(f"could not find the inpaint canvas (#{element_id} canvas)")
        # the last canvas is the one on top, which takes the pointer (gradio 3's sketch, Forge's canvas)
        box = None
        for index in reversed(range(canvases.count())):
            candidate = canvases.nth(index).bounding_box()
            if candidate and candidate["width"] > 20 and candidate["height"] > 20:
                box = candidate
                break
        if box is None:
            raise NotFound(f"the inpaint canvas has no size on the page (#{element_id} canvas)")
        mouse = self.page.mouse
        x0, y0 = box["x"] + box["width"] * 0.3, box["y"] + box["height"] * 0.5
        for row in range(5):
            y = y0 + (row - 2) * box["height"] * 0.05
            mouse.move(x0, y)
            mouse.down()
            for step in range(1, 11):
                mouse.move(x0 + box["width"] * 0.4 * step / 10, y)
            mouse.up()
        self.page.wait_for_timeout(500)

    def dropdown_choices(self, element_id: str) -> list[str]:
        """The labels a dropdown offers, in its order (opened as a person opens it)."""
        box = self.find(f"#{element_id} input", f"the dropdown {element_id}")
        box.click()
        options = self.page.locator(f"#{element_id} ul.options li")
        try:
            options.first.wait_for(state="visible", timeout=WAIT_MS)
        except Exception as error:
            self.shot("missing-dropdown-options")
            raise NotFound(f"the dropdown {element_id} opened no list (#{element_id} ul.options li)") from error
        labels = [text.strip() for text in options.all_inner_texts()]
        self.page.keyboard.press("Escape")
        box.blur()
        return [label.removeprefix("✓").strip() for label in labels]

    def choose_script(self, tab: str, title: str) -> None:
        container = "#txt2img_script_container" if tab == "txt2img" else "#img2img_script_container"
        element = self.page.locator(f"{container} #script_list").first
        if not element.count():
            raise NotFound(f"could not find the Script dropdown of {tab} ({container} #script_list)")
        box = element.locator("input").first
        box.click()
        box.fill(title)
        self.page.wait_for_timeout(300)
        box.press("Enter")
        self.page.keyboard.press("Escape")
        self.page.wait_for_timeout(1000)

    def enable_hires_fix(self, steps: int, scale: float) -> None:
        """Open the host's Hires fix accordion (which ticks it) and set its steps and factor."""
        header = self.find("#txt2img_hr .label-wrap", "the Hires fix accordion's header")
        if "open" not in (header.get_attribute("class") or ""):
            header.click()
        box = self.find("#txt2img_hr-visible-checkbox", "the Hires fix checkbox")
        if not box.is_checked():
            box.check()
        self.page.wait_for_timeout(300)
        self.set_number("txt2img_hires_steps", steps, "Hires steps")
        self.set_number("txt2img_hr_scale", scale, "Upscale by")

    def open_setting(self, key: str, search: str) -> Any:
        """Settings: find a checkbox setting through the settings search, as a person looks for it."""
        self.tab("Settings")
        search_box = self.find("#settings_search textarea, #settings_search input", "the settings search box")
        search_box.fill(search)
        self.page.wait_for_timeout(800)
        box = self.find(f"#setting_{key} input[type=checkbox]", f"the setting {search!r} (setting_{key})")
        self.shot(f"setting-{key}")
        return box

    def apply_settings(self) -> None:
        result = self.page.locator("#settings_result").first
        self.find("#settings_submit", "the Apply settings button").click()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            self.page.wait_for_timeout(300)
            if "changed" in (result.inner_text() if result.count() else ""):
                self.shot("settings-applied")
                return
        self.shot("settings-not-applied")
        raise AssertionError("Apply settings answered nothing in #settings_result")

    # -- generating -----------------------------------------------------------------------------------------
    def small_image(self, tab: str, size: int, steps: int) -> None:
        """Keep CPU runs short: a small image in few steps."""
        self.set_number(f"{tab}_width", size, f"{tab}'s width")
        self.set_number(f"{tab}_height", size, f"{tab}'s height")
        self.set_number(f"{tab}_steps", steps, f"{tab}'s sampling steps")
        prompt = self.text_input(f"{tab}_prompt", f"the {tab} prompt")
        prompt.fill("a red fox in the snow")

    def generate(self, tab: str) -> str:
        """Click Generate and wait for the new infotext under the image; returns its text."""
        info = self.page.locator(f"#html_info_{tab}").first
        before = info.inner_text() if info.count() else ""
        self.find(f"#{tab}_generate", f"the {tab} Generate button").click()
        deadline = time.monotonic() + GENERATION_S
        while time.monotonic() < deadline:
            self.page.wait_for_timeout(500)
            text = info.inner_text() if info.count() else ""
            if text != before and "Steps:" in text and not self._busy(tab):
                return text
            error = self.page.locator(f"#html_log_{tab} .error, #{tab}_results .error").first
            if error.count() and error.is_visible():
                self.shot("generation-error")
                raise AssertionError(f"the {tab} generation failed: {error.inner_text()}")
        self.shot("generation-timeout")
        raise AssertionError(f"no new infotext under the {tab} image after {GENERATION_S:.0f} s")

    def _busy(self, tab: str) -> bool:
        interrupt = self.page.locator(f"#{tab}_interrupt").first
        return bool(interrupt.count() and interrupt.is_visible())

    def comments(self, tab: str) -> str:
        """The WebUI's comments under the image (``p.comment``), where SEG says why it was off."""
        box = self.page.locator(f"#html_log_{tab}").first
        return box.inner_text() if box.count() else ""

    def gallery_images(self, tab: str) -> Any:
        return self.page.locator(f"#{tab}_gallery .thumbnail-item, #{tab}_gallery .thumbnails button")

    def api(self, path: str, payload: Any = None) -> Any:
        return http_json(self.url + path, payload)
