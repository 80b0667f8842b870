"""SEG on Forge, through Forge's own UNet patcher (new Forge ``backend/``, its Forge 2 forks, and the
``ldm_patched`` family: the 2024 Forge, reForge, Forge Classic).

Per sampling pass (``process_before_every_sampling``), the pass's UNet patcher is cloned and given a
post-CFG function that returns ``cfg_result + scale * (cond - cond_seg)``, where ``cond_seg`` is the
conditional branch run with ``attn1`` replace patches on the selected transformer blocks (the queries
smoothed, then the attention that would have run there: another extension's replace patch on that layer,
else the host's attention function). ``cond_seg`` comes from one of two paths:

- same call (the fast path, Settings > Smoothed Energy Guidance): before the host's UNet call of a step,
  SEG arms its ``model_function_wrapper`` when the step is simple (one cond entry, no area or mask), from a
  pre-CFG function where the host calls those before the UNet call, or from the host's cond-batch hook
  where it calls them after (reForge); the wrapper adds the smoothed rows to that call
  (``forge_same_call.py``), forked at the first selected block where the host's stock forward is one SEG
  knows (``forge_fork.py``);
- separate call: the post-CFG function runs the conditional branch once more through the host's
  ``calc_cond_uncond_batch``, every row smoothed.

How the running host calls all this is read from its code once (``forge_host.py``). Forge rebuilds its UNet
patcher from the LoRA-applied one before every sampling pass, so nothing outlives the pass; the hires pass's
double call is absorbed by recognising our own clone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from seg_lib.core.guidance import in_step_window, needs_uncond
from seg_lib.families import dit_family
from seg_lib.host import forge_dit
from seg_lib.host.forge_attn1 import attn1_patch
from seg_lib.host.forge_guidance import post_cfg_function
from seg_lib.host.forge_host import INNER_MODIFIER, ForgeHost
from seg_lib.host.forge_others import same_call_blockers
from seg_lib.host.forge_patches import (
    ALL_ROWS,
    GRID,
    SMOOTH_ROWS,
    add_block_inner_modifier,
    add_pre_cfg_first,
    see_grid,
    with_attn1_patches,
)
from seg_lib.host.forge_same_call import model_function_wrapper
from seg_lib.host.fork import first_block
from seg_lib.host.marks import owned
from seg_lib.host.run import Run

__all__ = ["ALL_ROWS", "SMOOTH_ROWS", "ForgeHost", "ForgeRun", "with_attn1_patches"]

# Cond entry keys that make the step's cond rows not a plain copy of the latents (regional prompting, or
# a cond that may skip the call): the same-call path leaves those steps alone.
_NOT_SIMPLE = ("area", "mask", "timestep_start", "timestep_end")
_WRAPPER_MISSED = "the UNet call did not go through SEG's wrapper"
_COMPILED = (
    "SEG is off for this generation: the UNet runs compiled (torch.compile, e.g. Forge Neo's Compile), and a "
    "compiled graph may be reused without SEG's patches, or with them for the wrong call; turn Compile off for SEG"
)


def compiled(model: Any) -> bool:
    """Whether the host's model runs through torch.compile: Forge Neo's Compile extension keeps the original
    ``apply_model`` as ``_orig_apply_model`` and puts a ``functools.wraps`` wrapper in its place."""
    apply_model = getattr(model, "apply_model", None)
    replaced = hasattr(apply_model, "__wrapped__") and not hasattr(apply_model, "__self__")  # not a method
    return getattr(model, "_orig_apply_model", None) is not None or replaced


@dataclass
class ForgeRun(Run):
    """One generation's SEG state on Forge."""

    host: ForgeHost | None = None
    step: int = 0
    total_steps: int = 1
    armed: bool = False  # this step's next UNet call with a cond chunk may carry the smoothed rows
    cond_seg: torch.Tensor | None = None  # those rows' output, for this step's post-CFG function
    why_separate: str = _WRAPPER_MISSED  # why this step falls back to the separate call (for the console)
    step_shape: tuple[int, ...] = ()  # the step's latent shape, as the arming hook saw it
    same_call_failed: bool = False  # the bigger call raised once: the separate call for the rest of the generation
    step_params: Any = None  # this step's CFGDenoiserParams: its ``x`` is what the step's real call gets
    step_call: bool | None = None  # whether the sampling call under way is the step's own (None: no hook saw it)
    call_x: Any = None  # the latents of the host's UNet call, where they differ from the post-CFG function's
    nothing_smoothed: bool = False  # the same call ran, but no selected layer could be smoothed this step
    fork_at: tuple[str, int] = ("input", 0)  # the first selected block: where the same call forks the branch
    fork_note: str = ""  # this step's same call: where it forked, or why not (for the console)
    dit: forge_dit.DitSeg | None = None  # the pass's DiT (Flux, Chroma, SD3.5); None: a UNet

    def on_denoiser(self, params: Any) -> None:
        """``on_cfg_denoiser``: Forge still reports the step here, which the window needs."""
        self.step, self.total_steps = params.sampling_step, params.total_sampling_steps
        self.step_params = params

    def _is_step_x(self, x: Any) -> bool:
        """Whether a sampling call works on this step's latents. Extensions run nested sampling calls on
        other latents within a step (Reference records its style from a noised reference image); SEG must
        neither guide those nor run its extra pass inside them, which would change what they record."""
        step_x = getattr(self.step_params, "x", None)
        return step_x is None or x is step_x

    def take_step_call(self, x: Any) -> bool:
        """In the post-CFG function: whether this sampling call is the step's own. Where SEG's hook saw the
        call begin, its verdict holds, taken from the latents it began with (a pre-CFG function of another
        extension may have replaced them since: ControlNet's inpaint does); else the latents decide."""
        verdict, self.step_call = self.step_call, None
        return self._is_step_x(x) if verdict is None else verdict

    def patch(self, p: Any) -> None:
        """Install SEG on this sampling pass's UNet patcher (once per pass)."""
        objects = p.sd_model.forge_objects
        if self.failed or getattr(objects.unet, "seg_run", None) is self:
            return
        model = getattr(objects.unet.model, "diffusion_model", None)
        family = dit_family(model)
        self.dit = None if family is None else forge_dit.prepare(self, model, family)
        refs = self.selected_layers(model) if family is None else ()
        if refs is None or (family is not None and self.dit is None):
            return
        if compiled(objects.unet.model):
            self.give_up(_COMPILED)
            return
        conventions = self.host.conventions
        if self.dit is None and conventions.grid is None:
            self.give_up(
                "SEG is off for this generation: this WebUI version shows SEG no layer's token grid "
                "(no block inner modifiers, no activations_shape)"
            )
            return
        unet = objects.unet.clone()
        if self.dit is None and conventions.grid == INNER_MODIFIER:
            add_block_inner_modifier(unet, see_grid)
        self.fork_at = first_block(refs) if refs else ("dit", 0)
        counts = {"smoothed": 0, "misplaced": 0}
        patches = {(ref.part, ref.index, ref.transformer): attn1_patch(self, ref, counts) for ref in refs}
        # snf fuses the CFG term, so at CFG 1 Forge must still compute the uncond prediction
        post_cfg = post_cfg_function(self, patches, counts)
        unet.set_model_sampler_post_cfg_function(post_cfg, disable_cfg1_optimization=needs_uncond(self.params))
        self.armed, self.cond_seg, self.step_call = False, None, None
        self._install_step_hook(unet)
        if not self.host.fast_path():
            self.why_separate = "fast path off in Settings"  # nothing else installed: the separate call only
        elif conventions.arming is None:
            self.why_separate = "this WebUI calls its pre-CFG functions after the UNet call and has no cond-batch hook"
        else:
            self.why_separate = _WRAPPER_MISSED
            previous = unet.model_options.get("model_function_wrapper")  # chained: its extension keeps working
            unet.set_model_unet_function_wrapper(model_function_wrapper(self, previous, patches, counts))
        unet.seg_run = self
        objects.unet = unet

    def _install_step_hook(self, unet: Any) -> None:
        """What sees each sampling call begin, before the host's UNet call: a pre-CFG function (first in
        line) where the host calls those before it, else the host's cond-batch hook (reForge)."""
        arming = self.host.conventions.arming
        if arming == "pre_cfg":
            # A closure, not the bound method: clone() deep-copies model_options, and a bound method would be
            # copied with its run (and p), leaving the copy armed instead of us.
            @owned
            def pre_cfg(model: Any, cond: Any, uncond: Any, x: Any, timestep: Any, model_options: Any) -> tuple:
                self.begin_call(model, cond, x, model_options)
                return model, cond, uncond, x, timestep, model_options

            add_pre_cfg_first(unet, pre_cfg)
        elif arming == "calc":
            options = unet.model_options
            previous = options.get("sampler_calc_cond_batch_function")

            @owned
            def calc_cond_batch(args: dict[str, Any]) -> Any:
                conds = args["conds"]
                other = previous is not None
                self.begin_call(args["model"], conds[0], args["input"], args["model_options"], other_batching=other)
                # reForge calls pre-CFG functions after the UNet call, and one may replace the latents the
                # post-CFG function gets (ControlNet's inpaint does): the separate call must see the call's.
                self.call_x = args["input"]
                if previous is not None:
                    return previous(args)
                return self.host.calc_cond_batch(
                    args["model"], conds, args["input"], args["sigma"], args["model_options"]
                )

            options["sampler_calc_cond_batch_function"] = calc_cond_batch

    def seg_step(self) -> bool:
        return not self.failed and in_step_window(self.step, self.total_steps, self.params.start, self.params.end)

    def begin_call(self, model: Any, cond: Any, x: Any, model_options: Any, other_batching: bool = False) -> None:
        """A sampling call begins: is it the step's own, and may the host's UNet call carry the smoothed rows?"""
        self.armed, self.cond_seg, self.nothing_smoothed = False, None, False
        self.step_call = self._is_step_x(x)
        if not (self.step_call and self.seg_step()):
            return
        if compiled(model):
            self.give_up(_COMPILED)
            return
        if not self.host.fast_path() or self.host.conventions.arming is None:
            return
        self.why_separate = _WRAPPER_MISSED
        blockers = same_call_blockers(model_options, own_keys=(GRID, SMOOTH_ROWS))
        if blockers:
            self.why_separate = blockers[0]
        elif other_batching:
            self.why_separate = "another extension's cond-batch function"
        elif len(cond) != 1:
            self.why_separate = "the prompt has several AND parts"
        elif any(key in cond[0] for key in _NOT_SIMPLE):
            self.why_separate = "regional (area/mask) conditioning"
        elif self.same_call_failed:
            self.why_separate = "the same-call path failed earlier in this generation"
        else:
            self.armed, self.step_shape = True, tuple(x.shape)
