"""Our script's title, and the API alias that reaches us when another script has the same title.

pamparamm/sd-perturbed-attention and v0xie/sd-webui-incantations both register an AlwaysVisible script titled
"Smoothed Energy Guidance", as we do. The WebUIs find ``alwayson_scripts`` entries by title (the first
script in load order whose ``title()`` matches), so with two installed the plain title reaches only the
first. ``ALIAS`` always reaches this extension:

- when we are the first (or the only) script with the title, the API guard renames an ``ALIAS`` entry to
  the title before the host reads the request;
- when another one loaded first, our ``title()`` answers ``ALIAS``, so the host itself finds us under it
  (the plain title reached the other script before and still does). The accordion's label stays the title.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

TITLE = "Smoothed Energy Guidance"
ALIAS = "Smoothed Energy Guidance (sd-webui-seg)"


def same_titled(scripts: Iterable[tuple[str, Any, str]], own: Any) -> tuple[list[str], bool]:
    """From ``(title, key, where)`` of each loaded script in the host's load order, the ``where`` of the
    *other* scripts titled like ours (case-insensitive, as the host compares), and whether ours comes
    before all of them (then the plain title reaches us)."""
    others: list[str] = []
    first = True
    for title, key, where in scripts:
        if key is own:
            first = not others
        elif str(title).strip().lower() == TITLE.lower():
            others.append(where)
    return others, first


def api_title(scripts: Iterable[tuple[str, Any, str]], own: Any) -> str:
    """The title the host should find us by: ``ALIAS`` when another script with our title loaded first."""
    others, first = same_titled(scripts, own)
    return ALIAS if others and not first else TITLE


def loaded_scripts(own: type) -> list[tuple[str, Any, str]]:
    """``(title, script class, file)`` of every script the WebUI loaded, in load order (the order of its
    API lookup); ``own`` is our script class. Other titles are read from bare instances (no ``__init__``:
    no side effects); a script whose title cannot be read that way is skipped."""
    from modules import scripts

    found = []
    for data in getattr(scripts, "scripts_data", []):
        cls = data.script_class
        if cls is own:  # not through title(): that is what asks
            found.append((TITLE, cls, data.path))
            continue
        try:
            title = cls.title(cls.__new__(cls))
        except Exception:  # another extension's title() that needs its own state: not ours to judge
            continue
        found.append((title, cls, data.path))
    return found


def clash_message(others: list[str], first: bool) -> str:
    reached = "this one" if first else "the other one"
    return (
        f'another script is also titled "{TITLE}" ({", ".join(others)}): API calls with that title in '
        f'alwayson_scripts reach {reached}; "{ALIAS}" always reaches this extension'
    )
