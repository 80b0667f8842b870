"""Giving back the CPU heap a SEG generation leaves free.

On a CPU the UNet's activations live on the C heap. SEG's extra rows make them bigger and of more sizes, and
glibc keeps the freed blocks for reuse instead of returning them: over a long A1111 session the server's
RSS then grows by hundreds of MiB that no object holds (the soak in ``tests/api`` measured it, and
``malloc_trim`` gave all but ~40 MiB back). So a generation in which SEG ran on the CPU ends with one
``malloc_trim(0)``. It returns only free pages, and costs milliseconds against a generation's seconds; on a
GPU the activations are not on this heap, and nothing is done.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from functools import cache


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None on another C library (musl, macOS, Windows have no such call)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own symbols: the C library it runs on
    except (AttributeError, OSError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def give_back_free_heap() -> bool:
    """Return the C heap's free pages to the system; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
