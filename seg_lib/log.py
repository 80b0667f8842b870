"""One console voice for the extension: every message is one line starting with ``[SEG]``."""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("sd-webui-seg")
PREFIX = "[SEG] "


def _write(line: str) -> None:
    # The WebUIs draw their progress bars with tqdm on the same console. On a terminal, tqdm.write clears
    # the bar, prints the line on its own and redraws the bar; a plain print would be glued to the bar's end.
    # Into a log file (no terminal) the bar's carriage returns do not start a line, so a newline ends it.
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    if tqdm is not None and sys.stdout.isatty():
        tqdm.write(line, file=sys.stdout)
        sys.stdout.flush()
        return
    bar_running = tqdm is not None and bool(getattr(tqdm, "_instances", None))
    print(("\n" if bar_running else "") + line, flush=True)


def log(message: str) -> None:
    """Print a line to the WebUI console (where users look) and to the logging system."""
    _write(PREFIX + message)
    logger.info(message)
