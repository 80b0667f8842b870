"""One console voice for the extension: every message starts with ``[SEG]``."""

from __future__ import annotations

import logging

logger = logging.getLogger("sd-webui-seg")


def log(message: str) -> None:
    """Print a line to the WebUI console (where users look) and to the logging system."""
    print(f"[SEG] {message}", flush=True)
    logger.info(message)
