"""Fixed check requests of the reliability runs: "SEG off equals the WebUI without the extension" (against
images recorded with the extension absent) and "SEG on equals the same request made earlier"."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tests.api.webui import OFF, generate, images

REFERENCES = Path(os.environ.get("SEG_REFERENCE_DIR", "/tmp/seg-references"))
# d0, not m0: at 64 px the middle block has a 1x1 token grid, where smoothing is the identity (SEG a no-op)
ON = [True, 3.0, "inf", "d0,m0", 0.0, 1.0]
PROBES: dict[str, tuple[str, dict[str, Any]]] = {  # name -> (kind, fields)
    "probe-t2i": ("txt2img", {"batch_size": 2, "width": 96, "height": 64}),
    "probe-inpaint": ("inpaint", {}),
    "probe-hires": ("hires", {}),
}


def _path(host: str) -> Path:
    return REFERENCES / f"reliability-{host}.json"


def record_references(host: str, *, forge: bool) -> Path:
    """Run with the extension absent: the probes' images, as the reference for "SEG off"."""
    found = {name: generate(kind, None, forge=forge, **fields)[0]["images"] for name, (kind, fields) in PROBES.items()}
    REFERENCES.mkdir(parents=True, exist_ok=True)
    _path(host).write_text(json.dumps(found))
    return _path(host)


def references(host: str) -> dict[str, list[bytes]] | None:
    from tests.api.webui import pixels

    if not _path(host).exists():
        return None
    return {name: [pixels(i) for i in found] for name, found in json.loads(_path(host).read_text()).items()}


def run_probes(seg: list[Any] | None, names: list[str], *, forge: bool) -> dict[str, list[bytes]]:
    return {name: images(generate(PROBES[name][0], seg, forge=forge, **PROBES[name][1])[0]) for name in names}


class ProbeCheck:
    """Counts probe rounds and mismatches: off against the no-extension reference, on against round 0."""

    def __init__(self, host: str, *, forge: bool, control: bool = False) -> None:
        self.forge = forge
        self.control = control  # the WebUI without the extension: SEG not named, no SEG-on probes
        self.reference = references(host)
        self.first_on: dict[str, list[bytes]] | None = None
        self.rounds = 0
        self.requests = 0
        self.off_mismatches: list[str] = []
        self.on_mismatches: list[str] = []

    def check(self, label: str, names: list[str] | None = None) -> None:
        """Off and on for the probes named (all by default; the soak runs only the first between rounds)."""
        names = names or list(PROBES)
        self.rounds += 1
        self.requests += len(names) if self.control else 2 * len(names)
        off = run_probes(None if self.control else OFF, names, forge=self.forge)
        if self.reference is not None:
            self.off_mismatches += [f"{label}:{name}" for name in off if off[name] != self.reference[name]]
        if self.control:
            return
        on = run_probes(ON, names, forge=self.forge)
        if self.first_on is None:
            self.first_on = on  # round 0 runs them all
            same = [name for name in on if on[name] == off[name]]
            assert not same, f"SEG on made the SEG-off image ({same}): the probe proves nothing"
        self.on_mismatches += [f"{label}:{name}" for name in on if on[name] != self.first_on[name]]

    def figures(self) -> dict[str, Any]:
        return {
            "probe_rounds": self.rounds,
            "probe_requests": self.requests,
            "reference_from_webui_without_extension": self.reference is not None,
            "off_mismatches": self.off_mismatches,
            "on_mismatches": self.on_mismatches,
        }
