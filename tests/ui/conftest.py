"""The UI tier: a real Chromium (the OS package, driven by Playwright) against a running WebUI with its UI.

Skipped as a whole without ``SEG_WEBUI_URL`` or without the ``playwright`` package (CI has neither); with
both, every test runs. Settings (environment): ``SEG_WEBUI_URL``; ``SEG_WEBUI_LOG``, the WebUI's console
log (the *Fast SEG* test reads SEG's console line there); ``SEG_UI_SHOTS``, where screenshots go (default
a temporary folder); ``SEG_CHROMIUM`` (default ``/usr/bin/chromium``); ``SEG_UI_SIZE`` / ``SEG_UI_STEPS``
(default 64 px, 2 steps: a CPU step is slow).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

URL = os.environ.get("SEG_WEBUI_URL", "").rstrip("/")
CHROMIUM = os.environ.get("SEG_CHROMIUM", "/usr/bin/chromium")
# No sandbox, GPU, network services or first-run pages: a headless browser in a container, offline.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
HERE = Path(__file__).resolve().parent


def _why_skipped() -> str | None:
    if not URL:
        return "UI tier: set SEG_WEBUI_URL to a WebUI started with its UI"
    if importlib.util.find_spec("playwright") is None:
        return "UI tier: the playwright package is not installed (pip install playwright)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _why_skipped()
    if reason is None:
        return
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def shots_dir() -> Path:
    path = Path(os.environ.get("SEG_UI_SHOTS") or tempfile.mkdtemp(prefix="seg-ui-shots-"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def gradio_major() -> int:
    from tests.ui.webui import gradio_major as read

    return read(URL)


@contextlib.contextmanager
def fresh_browser(width: int = 1400) -> Iterator[Any]:
    """A headless Chromium context with a new, empty profile (nothing remembered from other runs), removed after."""
    from playwright.sync_api import sync_playwright

    profile = tempfile.mkdtemp(prefix="seg-ui-profile-")
    try:
        with sync_playwright() as playwright:
            context = playwright.chromium.launch_persistent_context(
                profile,
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": width, "height": 1000},
            )
            try:
                yield context
            finally:
                context.close()
    finally:
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="session")
def browser_context() -> Iterator[object]:
    """One Chromium with a fresh profile for the session."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set SEG_CHROMIUM)")
    with fresh_browser() as context:
        yield context


@pytest.fixture
def webui(request: pytest.FixtureRequest, browser_context, shots_dir: Path, gradio_major: int):
    """A fresh page on the WebUI, loaded; its screenshots go to ``<shots>/<test name>/``."""
    from tests.ui.webui import WebUI

    page = browser_context.new_page()
    page.set_default_timeout(30_000)
    ui = WebUI(page, URL, shots_dir, request.node.name, gradio_major)
    try:
        ui.open()
        yield ui
    finally:
        ui.shot("end")
        page.close()


@pytest.fixture(scope="session")
def size() -> int:
    return int(os.environ.get("SEG_UI_SIZE", "64"))


@pytest.fixture(scope="session")
def steps() -> int:
    return int(os.environ.get("SEG_UI_STEPS", "2"))
