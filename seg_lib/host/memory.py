"""Giving back the CPU heap a SEG generation leaves free.

On a CPU the UNet's activations live on the C heap. SEG's extra rows make them bigger and of more sizes, and
glibc keeps the freed blocks for reuse instead of returning them: over a long A1111 session the server's
RSS then grows by hundreds of MiB that no object holds (the soak in ``tests/api`` measured it, and
``malloc_trim`` gave all but ~40 MiB back). So a generation in which SEG ran on the CPU ends with one
``malloc_trim(0)``. It returns only free pages, and costs milliseconds against a generation's seconds; on a
GPU the activations are not on this heap, and nothing is done.

A user who told glibc to keep freed memory (``MALLOC_TRIM_THRESHOLD_`` / ``MALLOC_MMAP_THRESHOLD_``, or their
``GLIBC_TUNABLES`` names) chose speed over RSS: on a CPU whose first touch of new memory is dear, that keeps the
host's attention from paying its page faults every step. The trim would hand that kept heap back after every
SEG generation, so it is skipped there.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable, Mapping
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


_KEEP_VARIABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
_KEEP_TUNABLES = ("glibc.malloc.trim_threshold", "glibc.malloc.mmap_threshold")


def user_keeps_heap(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the process was started with glibc told how to keep freed memory (read at start-up, so the
    environment is the process's own)."""
    if any(environ.get(name) for name in _KEEP_VARIABLES):
        return True
    tunables = environ.get("GLIBC_TUNABLES", "")
    return any(f"{name}=" in tunables for name in _KEEP_TUNABLES)


def give_back_free_heap() -> bool:
    """Return the C heap's free pages to the system; False where the C library cannot or the user asked glibc
    to keep them."""
    trim = _malloc_trim()
    if trim is None or user_keeps_heap():
        return False
    trim(0)
    return True
