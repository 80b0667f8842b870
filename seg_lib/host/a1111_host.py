"""What SEG reads from the running AUTOMATIC1111, and the host's conditioning as its CFG denoiser builds it."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn


def cond_rows(text_cond: Any) -> int:
    """Number of cond rows in the host's stacked conditioning (tensor or SDXL dict)."""
    if isinstance(text_cond, dict):
        return next(iter(text_cond.values())).shape[0]
    return text_cond.shape[0]


def make_condition(text_cond: Any, image_cond: torch.Tensor, conditioning_key: str | None) -> dict[str, Any]:
    """The conditioning dict the host's inner model takes, built as ``CFGDenoiser.forward`` builds it."""
    if conditioning_key == "crossattn-adm":  # unCLIP: image_cond holds the image embedding
        return {"c_crossattn": [text_cond], "c_adm": image_cond}
    if isinstance(text_cond, dict):  # SDXL: crossattn + vector
        return {**text_cond, "c_concat": [image_cond]}
    return {"c_crossattn": [text_cond], "c_concat": [image_cond]}


class Host:
    """What the adapter reads from the running A1111 (a stand-in replaces it in tests)."""

    def unet(self) -> nn.Module | None:
        """The UNet now in use; a refiner switch changes it mid-generation."""
        from modules import shared

        model = getattr(shared.sd_model, "model", None)
        return getattr(model, "diffusion_model", None)

    def conditioning_key(self) -> str | None:
        from modules import shared

        return getattr(getattr(shared.sd_model, "model", None), "conditioning_key", None)

    def opts(self) -> Any:
        from modules import shared

        return shared.opts

    def stock_forwards(self) -> dict[Callable[..., Any], bool]:
        """The UNet forwards known to be the stock one (the host's patched wrappers and the originals),
        each with whether it casts its input (ldm does, sgm does not)."""
        from modules import sd_hijack

        stock = {}
        for name, casts in (
            ("ldm_patched_forward", True),
            ("ldm_original_forward", True),
            ("sgm_patched_forward", False),
            ("sgm_original_forward", False),
        ):
            if (function := getattr(sd_hijack, name, None)) is not None:
                stock[function] = casts
        return stock

    def custom_unet_active(self) -> bool:
        """A ``sd_unet`` replacement (TensorRT and the like) takes over the stock forward."""
        from modules import sd_unet

        return getattr(sd_unet, "current_unet", None) is not None

    def token_regrouping(self) -> str:
        """Host features that split or merge a layer's tokens, for the console line of a skipped layer."""
        opts, found = self.opts(), []
        if getattr(opts, "hypertile_enable_unet", False) or getattr(opts, "hypertile_enable_unet_secondpass", False):
            found.append("Hypertile U-Net is on")
        if any(getattr(opts, key, 0) for key in ("token_merging_ratio", "token_merging_ratio_hr")):
            found.append("token merging is on")
        return ", ".join(found)

    def call_state(self) -> Any:
        """The state other extensions draw from at every UNet call: Hypertile's tile-size generator."""
        rng = getattr(sys.modules.get("hypertile"), "RNG_INSTANCE", None)
        return None if rng is None else (rng, rng.getstate())

    @contextlib.contextmanager
    def extra_call(self, before_host_call: Any) -> Iterator[None]:
        """Around SEG's own extra UNet call: Hypertile draws its tiles at random at every attention call. The
        extra call replays the draws of the host's call (``before_host_call``, taken before it), so the cond
        rows' copies are tiled as the cond rows were; then the generator goes back to where the host's call
        left it, so the host's later calls tile as they would without SEG."""
        if before_host_call is None:
            yield
            return
        rng, before = before_host_call
        after = rng.getstate()
        rng.setstate(before)
        try:
            yield
        finally:
            rng.setstate(after)


def match_host_padding(host: Host, denoiser: Any, text_cond: Any, text_uncond: Any) -> Any:
    """The cond rows padded the way the host padded them for its own call (so cond and cond_seg match)."""
    tensor = text_cond["crossattn"] if isinstance(text_cond, dict) else text_cond
    other = text_uncond["crossattn"] if isinstance(text_uncond, dict) else text_uncond
    if tensor.shape[1] == other.shape[1] or isinstance(text_cond, dict):
        return text_cond  # equal already, or a dict the host padded in place
    opts = host.opts()
    if getattr(opts, "pad_cond_uncond_v0", False):
        return text_cond  # v0 pads only the uncond
    if getattr(opts, "pad_cond_uncond", False):
        return denoiser.pad_cond_uncond(text_cond, text_uncond)[0]
    return text_cond
