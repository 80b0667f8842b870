"""Test-only (never shipped with SEG): what of SEG is alive in the server process between generations, so a
soak can tell SEG's own accumulation from the host's. ``GET /seg-probe/live`` after a full collection:
the live objects of SEG's classes by type, the tensors they reach, and all live torch tensors.
``GET /seg-probe/heap``: glibc's heap figures (in use, held free), read without changing anything.
``POST /seg-probe/trim``: the server's RSS before and after returning the allocator's free memory."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys
from collections import Counter
from typing import Any

import torch
from modules import script_callbacks


def _ours(obj: Any) -> bool:
    module = getattr(type(obj), "__module__", "")
    return isinstance(module, str) and (module.startswith("seg_lib") or module == "seg.py")


def _live() -> dict[str, Any]:
    gc.collect()
    objects = gc.get_objects()
    ours = [obj for obj in objects if _ours(obj)]
    tensors = [obj for obj in objects if isinstance(obj, torch.Tensor)]
    reached = {id(t): t for t in gc.get_referents(*ours) if isinstance(t, torch.Tensor)} if ours else {}
    return {
        "seg_objects": dict(Counter(type(obj).__qualname__ for obj in ours)),
        "tensors_reached_by_seg_objects": len(reached),
        "tensors": len(tensors),
        "tensor_mib": round(sum(t.numel() * t.element_size() for t in tensors if not t.is_meta) / 2**20, 1),
        "blur_cache": _blur_cache(),
    }


def _blur_cache() -> dict[str, int]:
    blur = sys.modules.get("seg_lib.core.blur")
    if blur is None:
        return {}
    return {name: fn.cache_info().currsize for name, fn in vars(blur).items() if hasattr(fn, "cache_info")}


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _heap() -> dict[str, Any]:
    """glibc's ``mallinfo2`` over all arenas: the bytes in use (heap blocks and mmapped ones) and the free
    bytes the heap keeps. Unlike a trim it changes nothing, so a soak can read it mid-run."""
    gc.collect()
    libc = _libc()
    mallinfo2 = getattr(libc, "mallinfo2", None)  # glibc 2.33+
    if mallinfo2 is None:
        return {"rss_mib": round(_rss_mib(), 1), "heap": False}
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return {
        "rss_mib": round(_rss_mib(), 1),
        "heap": True,
        "in_use_mib": round((info.uordblks + info.hblkhd) / 2**20, 1),
        "free_held_mib": round(info.fordblks / 2**20, 1),
    }


def _trim() -> dict[str, Any]:
    """RSS before and after glibc's ``malloc_trim(0)``: memory the allocator holds free (fragmentation) is
    given back, memory still in use is not, which tells an allocator's growth from a leak."""
    gc.collect()
    before = _rss_mib()
    libc = _libc()
    trimmed = libc is not None and hasattr(libc, "malloc_trim")  # glibc only
    if trimmed:
        libc.malloc_trim(0)
    return {"rss_mib_before": round(before, 1), "rss_mib_after": round(_rss_mib(), 1), "trimmed": trimmed}


def _on_app_started(_demo: Any, app: Any) -> None:
    app.add_api_route("/seg-probe/live", _live, methods=["GET"])
    app.add_api_route("/seg-probe/heap", _heap, methods=["GET"])
    app.add_api_route("/seg-probe/trim", _trim, methods=["POST"])


script_callbacks.on_app_started(_on_app_started)
