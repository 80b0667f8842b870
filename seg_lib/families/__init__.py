"""Model families SEG knows, apart from the hosts: each DiT family is one module (its block lists, where its
image queries are, its token grid); the SD/SDXL UNet layout is read by
``unet.py``."""

from __future__ import annotations

from typing import Any

from seg_lib.families.dit import DitFamily
from seg_lib.families.flux import CHROMA, FLUX
from seg_lib.families.lumina2 import LUMINA2, ZIMAGE
from seg_lib.families.sd35 import SD35

# Chroma before Flux: it has Flux's block lists too. Lumina 2 and Z-Image share one structure (``lumina2.py``).
DIT_FAMILIES: tuple[DitFamily, ...] = (CHROMA, FLUX, SD35, LUMINA2, ZIMAGE)


def dit_family(model: Any) -> DitFamily | None:
    """The DiT family of a loaded diffusion model, or None (a UNet, or a DiT SEG does not know yet)."""
    return next((family for family in DIT_FAMILIES if family.matches(model)), None)


__all__ = ["CHROMA", "DIT_FAMILIES", "FLUX", "LUMINA2", "SD35", "ZIMAGE", "DitFamily", "dit_family"]
