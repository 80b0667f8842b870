"""SEG on Forge, through Forge's own UNet patcher (new Forge ``backend/`` and the ``ldm_patched`` family).

Per sampling pass (``process_before_every_sampling``), the pass's UNet patcher is cloned and given one
post-CFG function. At each step inside the window it runs the conditional branch once more through the
host's ``calc_cond_uncond_batch``, with ``attn1`` replace patches on the selected transformer blocks (the
queries smoothed, then the host's own attention function), and returns
``cfg_result + scale * (cond - cond_seg)``. Forge rebuilds its UNet patcher from the LoRA-applied one
before every sampling pass, so nothing outlives the pass; the hires pass's double call is absorbed by
recognising our own clone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from seg_lib.core.blocks import LayerRef
from seg_lib.core.guidance import in_step_window, seg_guidance
from seg_lib.host.run import Run


def with_attn1_patches(model_options: dict[str, Any], patches: dict[tuple[str, int, int], Any]) -> dict[str, Any]:
    """A copy of ``model_options`` with ``attn1`` replace patches added (the original is left alone)."""
    options = dict(model_options)
    transformer_options = dict(options.get("transformer_options", {}))
    replace = dict(transformer_options.get("patches_replace", {}))
    attn1 = dict(replace.get("attn1", {}))
    attn1.update(patches)
    replace["attn1"] = attn1
    transformer_options["patches_replace"] = replace
    options["transformer_options"] = transformer_options
    return options


@dataclass
class ForgeHost:
    """The two host functions the adapter calls (a stand-in replaces them in tests)."""

    calc_cond_uncond_batch: Any
    attention: Any  # attention(q, k, v, heads) -> [B, N, heads * dim_head]

    @staticmethod
    def load(host: str) -> ForgeHost:
        if host == "forge":
            from backend.attention import attention_function
            from backend.sampling.sampling_function import calc_cond_uncond_batch

            return ForgeHost(calc_cond_uncond_batch, attention_function)
        from ldm_patched.ldm.modules.attention import optimized_attention
        from ldm_patched.modules.samplers import calc_cond_uncond_batch

        return ForgeHost(calc_cond_uncond_batch, optimized_attention)


@dataclass
class ForgeRun(Run):
    """One generation's SEG state on Forge."""

    host: ForgeHost | None = None
    step: int = 0
    total_steps: int = 1

    def on_denoiser(self, params: Any) -> None:
        """``on_cfg_denoiser``: Forge still reports the step here, which the window needs."""
        self.step, self.total_steps = params.sampling_step, params.total_sampling_steps

    def patch(self, p: Any) -> None:
        """Install SEG on this sampling pass's UNet patcher (once per pass)."""
        objects = p.sd_model.forge_objects
        if self.failed or getattr(objects.unet, "seg_run", None) is self:
            return
        refs = self.selected_layers(getattr(objects.unet.model, "diffusion_model", None))
        if refs is None:
            return
        unet = objects.unet.clone()
        unet.set_model_sampler_post_cfg_function(self._post_cfg_function(refs))
        unet.seg_run = self
        objects.unet = unet

    def _post_cfg_function(self, refs: tuple[LayerRef, ...]) -> Any:
        counts = {"smoothed": 0}
        patches = {(ref.part, ref.index, ref.transformer): self._attn1_patch(ref, counts) for ref in refs}

        def post_cfg(args: dict[str, Any]) -> torch.Tensor:
            result = args["denoised"]
            if self.failed or not in_step_window(self.step, self.total_steps, self.params.start, self.params.end):
                return result
            try:
                counts["smoothed"] = 0
                options = with_attn1_patches(args["model_options"], patches)
                cond_seg, _ = self.host.calc_cond_uncond_batch(
                    args["model"], args["cond"], None, args["input"], args["sigma"], options
                )
                if counts["smoothed"] == 0:
                    self.give_up("SEG: none of the selected layers could be smoothed (merged tokens?)")
                    return result
                # The host scales CFG by the summed AND weights when they do not sum to 1; so is SEG.
                strength = sum(item.get("strength", 1) for item in args["cond"])
                scale = self.params.scale * (1.0 if math.isclose(strength, 1.0) else strength)
                return seg_guidance(result, args["cond_denoised"], cond_seg, scale)
            except Exception as error:  # SEG must never break the user's generation
                self.give_up(f"SEG failed and is off for the rest of this generation: {error!r}")
                return result

        return post_cfg

    def _attn1_patch(self, ref: LayerRef, counts: dict[str, int]) -> Any:

        def attn1(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict[str, Any]) -> torch.Tensor:
            height, width = extra_options["original_shape"][-2:]
            smoothed = self.smoothed(ref, q, height, width)
            if smoothed is not None:
                q = smoothed
                counts["smoothed"] += 1
            return self.host.attention(q, k, v, extra_options["n_heads"])

        return attn1
