"""Test-only (never shipped with SEG): what of SEG is alive in the server process between generations, so a
soak can tell SEG's own accumulation from the host's. ``GET /seg-probe/live`` after a full collection:
the live objects of SEG's classes by type, the tensors they reach, and all live torch tensors."""

from __future__ import annotations

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


def _on_app_started(_demo: Any, app: Any) -> None:
    app.add_api_route("/seg-probe/live", _live, methods=["GET"])


script_callbacks.on_app_started(_on_app_started)
