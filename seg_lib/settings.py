"""The extension's one WebUI setting (Settings > Smoothed Energy Guidance), also settable per API request
through ``override_settings``. It changes speed, never the method: both paths give the same guidance."""

from __future__ import annotations

from typing import Any

from seg_lib.ui import TITLE

FAST_PATH = "seg_fast_path"
SECTION = ("seg", TITLE)
FAST_PATH_LABEL = (
    "Fast SEG: compute SEG's extra prediction inside the WebUI's own UNet call (faster, the same guidance). "
    "Off: a separate extra UNet call on every step (slower; for comparing or troubleshooting)."
)


def fast_path_enabled(opts: Any) -> bool:
    """Whether the fast path is wanted (the default, also when the host has no such option yet)."""
    return bool(getattr(opts, FAST_PATH, True))


def register(shared: Any) -> None:
    """Add the option to the host's options (and so to its settings page); called when the script loads."""
    shared.opts.add_option(FAST_PATH, shared.OptionInfo(True, FAST_PATH_LABEL, section=SECTION))
