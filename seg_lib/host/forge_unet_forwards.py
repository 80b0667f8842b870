"""The stock SD UNet forwards of the Forge family that SEG's fork reproduces (``forge_fork.py``), and which one a
running host has, read from its source: a forward with a fingerprint SEG does not know is not forked."""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

from seg_lib.host import reading


@dataclass(frozen=True)
class Variant:
    """One stock UNet forward the fork reproduces: where it is, and how its body differs from the others."""

    name: str
    entry: str = "forward"  # the method the fork stands in for during one call
    via_embed: bool = False  # blocks run through the module's ``forward_timestep_embed`` with the video arguments
    block_modifiers: bool = True  # ``block_modifiers`` run before and after each block and the output layer
    group_norm_wrapper: bool = False  # the output layer's norm may be wrapped (``group_norm_wrapper``)
    emb_patch: bool = False  # ``emb_patch`` patches act on the time embedding
    cast_before_out: bool = False  # the hidden state is cast to the input's dtype before the output layer
    image_only_default: bool = True  # ``image_only_indicator`` defaults to the UNet's own default (else None)


BACKEND = Variant("backend", group_norm_wrapper=True)  # new Forge and its Forge 2 forks: backend/nn/unet.py
LDM_PATCHED = Variant("ldm_patched", via_embed=True)  # the 2024 Forge and Forge Classic
COMFY = Variant(  # reForge: ComfyUI's openaimodel, behind a diffusion-model wrapper executor
    "ldm_patched (ComfyUI's)",
    entry="_forward",
    via_embed=True,
    block_modifiers=False,
    emb_patch=True,
    cast_before_out=True,
    image_only_default=False,
)
# What each stock forward reads and calls (``reading.fingerprint``), read from the hosts' source; a forward
# with another fingerprint is a version the fork does not know, and the copies run through the whole UNet.
KNOWN_FORWARDS = {
    "6928550a48d9": (BACKEND, "Forge main dfdcbab6, ersatzForge fca12a2"),
    "77568dc82d64": (LDM_PATCHED, "Forge Classic 1f95d717"),
    "abad385ee7ea": (COMFY, "reForge 3b56b268"),
}
_NEEDED = ("timestep_embedding", "apply_control")


def read_forward(cls: type, namespace: ModuleType | None) -> Variant | str:
    """Which known stock forward the UNet class ``cls`` (of module ``namespace``) has, or why none."""
    if namespace is None:
        return f"the module of its UNet class {cls.__name__} is not loaded"
    for entry in ("forward", "_forward"):
        method = getattr(cls, entry, None)
        known = KNOWN_FORWARDS.get(reading.fingerprint(method, namespace) or "")
        if known is None or known[0].entry != entry:
            continue
        variant = known[0]
        if entry == "_forward" and not reading.reads_attribute(cls.forward, "_forward"):
            return f"its UNet forward does not call {entry}"
        needed = (*_NEEDED, *(("forward_timestep_embed",) if variant.via_embed else ()))
        if not all(callable(getattr(namespace, name, None)) for name in needed):
            return f"the UNet's module lacks one of {', '.join(needed)}"
        return variant
    return f"its UNet forward ({cls.__module__}.{cls.__name__}) is a version SEG does not know"


def stock_forwards(host: str) -> tuple[dict[type, Variant], str]:
    """The host's SD UNet class with the forward the fork reproduces, or no entry and why (imports the host;
    call it in the WebUI)."""
    if host == "forge":
        from backend.nn import unet as module

        cls = module.IntegratedUNet2DConditionModel
    else:
        from ldm_patched.ldm.modules.diffusionmodules import openaimodel as module

        cls = module.UNetModel
    variant = read_forward(cls, module)
    return ({}, variant) if isinstance(variant, str) else ({cls: variant}, "")
