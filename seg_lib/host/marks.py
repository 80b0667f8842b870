"""SEG's mark on the functions it installs in a host (patches, wrappers, hooks), so that the checks for
other extensions' state (``a1111_others``, ``forge_others``) do not count SEG's own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

OWNED = "seg_owned"
F = TypeVar("F", bound=Callable[..., Any])


def owned(function: F) -> F:
    """Mark ``function`` as SEG's."""
    setattr(function, OWNED, True)
    return function


def is_owned(function: object) -> bool:
    """Whether ``function`` (or the function a ``functools.partial`` wraps) carries SEG's mark."""
    return bool(getattr(function, OWNED, False) or getattr(getattr(function, "func", None), OWNED, False))
