"""Flux (dev, schnell) and Chroma: 19 double-stream blocks (text and image streams, one joint attention) then
38 single-stream blocks (one sequence). The query of every block is ``cat(text, image[, reference])``, text
first; the latent is padded to even sides and cut in 2x2 patches, so the image grid is ceil(H/2) x ceil(W/2).
RoPE is applied to q and k right before the attention kernel, which therefore gets the final queries."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from seg_lib.families.dit import DitFamily

_STACKS = (("double", "double_blocks"), ("single", "single_blocks"))
# The default: the layers of ComfyUI's Skip Layer Guidance node for DiTs (SkipLayerGuidanceDiT, double and
# single layers 7, 8, 9), the guidance Flux users know; see the README's "Layers on DiT models".
_DEFAULT = "double7-9,single7-9"
_SOURCE = "ComfyUI SkipLayerGuidanceDiT (double and single layers 7, 8, 9)"


def _is_chroma(model: nn.Module) -> bool:
    return hasattr(model, "distilled_guidance_layer")


FLUX = DitFamily(
    name="Flux",
    stacks=_STACKS,
    after=("final_layer",),
    default_layers=_DEFAULT,
    default_source=_SOURCE,
    text_first=True,
    ceil_grid=True,
    real_cfg=False,  # dev is guidance-distilled (its guidance is an input), schnell is step-distilled
    is_model=lambda model: hasattr(model, "img_in") and hasattr(model, "txt_in") and not _is_chroma(model),
)
CHROMA = replace(FLUX, name="Chroma", real_cfg=True, is_model=_is_chroma)  # Flux's blocks, real CFG
