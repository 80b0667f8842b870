"""One console voice for the extension: every message is one line starting with ``[SEG]``."""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("sd-webui-seg")
PREFIX = "[SEG] "


def _write(line: str) -> None:
    # The WebUIs draw their progress bars with tqdm on the same console; tqdm.write clears the bar, prints
    # the line on its own and redraws the bar, where a plain print would be glued to the bar's end.
    try:
        from tqdm import tqdm
    except ImportError:
        print(line, flush=True)
        return
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def log(message: str) -> None:
    """Print a line to the WebUI console (where users look) and to the logging system."""
    _write(PREFIX + message)
    logger.info(message)
