"""SEG on AUTOMATIC1111 1.10: the extra conditional pass, run inside the host's CFG denoiser.

Flow per sampling step, for a generation with SEG on:

1. ``on_cfg_denoiser`` (registered once, stateless) finds the generation's ``SegRun`` on ``p`` and, inside
   the step window, stashes the batched inputs the host built: ``x_in``, ``sigma_in``, ``image_cond_in`` and
   the cond rows. It also wraps ``combine_denoised`` on that denoiser *instance* (the denoiser lives for one
   sampling pass, so the wrapper dies with it).
2. The host runs its own UNet call(s). In the wrapped ``combine_denoised`` the host's CFG result is computed
   first; then one cond-only UNet call runs with the queries of the selected ``attn1`` layers smoothed
   (forward hooks on ``attn1.to_q``, present only for the duration of that call), and
   ``cfg_result + scale * (cond - cond_seg)`` is returned, AND-prompt weights applied. Inpaint blending,
   previews and ``on_cfg_after_cfg`` then see the guided result, exactly as they see plain CFG.

Nothing is patched outside an extra call, so an error, an interrupt or a skipped job leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from seg_lib.core.blocks import LayerRef
from seg_lib.core.guidance import cond_weights, in_step_window, seg_guidance
from seg_lib.host.run import Run
from seg_lib.host.unet_layout import attn1_module

# The resolved attn1 layers of one loaded UNet, with their modules.
_Targets = list[tuple[LayerRef, nn.Module]]


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


@dataclass
class SegRun(Run):
    """One generation's SEG state on A1111."""

    host: Host = field(default_factory=Host)
    _stash: Any = None  # this step's CFGDenoiserParams: the host reads its inputs back from it too
    _targets: dict[int, _Targets | None] = field(default_factory=dict)

    # -- host callbacks -------------------------------------------------------------------------------
    def on_denoiser(self, params: Any) -> None:
        """``on_cfg_denoiser``: remember this step's inputs when SEG runs at this step."""
        self._stash = None
        if self.failed or not in_step_window(
            params.sampling_step, params.total_sampling_steps, self.params.start, self.params.end
        ):
            return
        self._wrap_combine(params.denoiser)
        self._stash = params

    def _wrap_combine(self, denoiser: Any) -> None:
        if getattr(denoiser, "seg_wrapped_by", None) is self:
            return
        plain = denoiser.combine_denoised
        for_edit = denoiser.combine_denoised_for_edit_model

        @functools.wraps(plain)
        def combine_denoised(x_out: torch.Tensor, conds_list: Any, uncond: Any, cond_scale: float) -> torch.Tensor:
            result = plain(x_out, conds_list, uncond, cond_scale)
            return self._guide(denoiser, result, x_out, conds_list)

        @functools.wraps(for_edit)
        def combine_denoised_for_edit_model(x_out: torch.Tensor, cond_scale: float) -> torch.Tensor:
            result = for_edit(x_out, cond_scale)
            return self._guide(denoiser, result, x_out, None)

        denoiser.combine_denoised = combine_denoised
        denoiser.combine_denoised_for_edit_model = combine_denoised_for_edit_model
        denoiser.seg_wrapped_by = self

    # -- the extra pass -------------------------------------------------------------------------------
    def _guide(self, denoiser: Any, result: torch.Tensor, x_out: torch.Tensor, conds_list: Any) -> torch.Tensor:
        stash, self._stash = self._stash, None
        if stash is None or self.failed:
            return result
        try:
            rows = cond_rows(stash.text_cond)
            cond_seg = self._extra_pass(denoiser, stash, rows)
            if cond_seg is None:
                return result
            weights = None
            if conds_list is not None and not all(pairs == [(i, 1.0)] for i, pairs in enumerate(conds_list)):
                weights = cond_weights(conds_list, rows, dtype=result.dtype, device=result.device)
            return seg_guidance(result, x_out[:rows], cond_seg, self.params.scale, weights)
        except Exception as error:  # SEG must never break the user's generation
            self.give_up(f"SEG failed and is off for the rest of this generation: {error!r}")
            return result

    def _extra_pass(self, denoiser: Any, stash: Any, rows: int) -> torch.Tensor | None:
        targets = self._targets_for(self.host.unet())
        if targets is None:
            return None
        height, width = stash.x.shape[-2:]
        text_cond = match_host_padding(self.host, denoiser, stash.text_cond, stash.text_uncond)
        blurred = [0]
        with self._smoothing(targets, height, width, blurred):
            cond_seg = denoiser.inner_model(
                stash.x[:rows],
                stash.sigma[:rows],
                cond=make_condition(text_cond, stash.image_cond[:rows], self.host.conditioning_key()),
            )
        if blurred[0] == 0:
            self.give_up("SEG: none of the selected layers could be smoothed (custom UNet or merged tokens)")
            return None
        return cond_seg

    def _targets_for(self, unet: nn.Module | None) -> _Targets | None:
        key = id(unet)
        if key not in self._targets:
            self._targets[key] = self._resolve(unet)
        return self._targets[key]

    def _resolve(self, unet: nn.Module | None) -> _Targets | None:
        refs = self.selected_layers(unet)
        if refs is None:
            return None
        return [(ref, attn1_module(unet, ref)) for ref in refs]

    @contextlib.contextmanager
    def _smoothing(self, targets: _Targets, height: int, width: int, blurred: list[int]) -> Iterator[None]:
        """Forward hooks on each selected ``attn1.to_q`` for the duration of one extra UNet call."""

        def hook_for(ref: LayerRef) -> Callable[..., torch.Tensor]:
            def smooth(_module: nn.Module, _args: object, q: torch.Tensor) -> torch.Tensor:
                smoothed = self.smoothed(ref, q, height, width)
                if smoothed is None:
                    return q
                blurred[0] += 1
                return smoothed

            return smooth

        handles = [module.to_q.register_forward_hook(hook_for(ref)) for ref, module in targets]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
