"""The extension's one WebUI setting (Settings > Smoothed Energy Guidance), also settable per API request
through ``override_settings``. It changes speed, never the method: both paths give the same guidance."""

from __future__ import annotations

from typing import Any

from seg_lib.ui import TITLE

FAST_PATH = "seg_fast_path"
SECTION = ("seg", TITLE)
FAST_PATH_LABEL = (
    "Fast SEG: compute the smoothed branch inside the host's own UNet call (A1111: forked from the "
    "conditional branch at the first SEG layer; Forge: in the same batch). Off: a separate extra UNet call."
)


def fast_path_enabled(opts: Any) -> bool:
    """Whether the fast path is wanted (the default, also when the host has no such option yet)."""
    return bool(getattr(opts, FAST_PATH, True))


def register(shared: Any) -> None:
    """Add the option to the host's options (and so to its settings page); called when the script loads."""
    shared.opts.add_option(FAST_PATH, shared.OptionInfo(True, FAST_PATH_LABEL, section=SECTION))
