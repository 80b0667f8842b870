"""The Forge run's post-CFG function: SEG's term added to the host's CFG result, from the smoothed rows of the
same UNet call, or from a separate conditional call with the selected layers smoothed."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any

import torch

from seg_lib.core.guidance import rescale_args, seg_guidance
from seg_lib.host.forge_patches import with_attn1_patches
from seg_lib.host.marks import owned

if TYPE_CHECKING:
    from seg_lib.host.forge import ForgeRun


def post_cfg_function(run: ForgeRun, patches: dict[tuple[str, int, int], Any], counts: dict[str, int]) -> Any:
    @owned
    def post_cfg(args: dict[str, Any]) -> torch.Tensor:
        result = args["denoised"]
        if not run.take_step_call(args["input"]):
            run.declined("the sampling calls SEG saw were other extensions' nested calls")
            return result  # a nested call of another extension: nothing of this step's is consumed
        cond_seg, run.cond_seg, run.armed = run.cond_seg, None, False
        x = args["input"] if run.call_x is None else run.call_x
        run.call_x = None
        nothing_smoothed, run.nothing_smoothed = run.nothing_smoothed, False
        if not run.seg_step() or nothing_smoothed:
            return result
        try:
            if cond_seg is not None and cond_seg.shape == args["cond_denoised"].shape:
                note = run.fork_note
                run.say_once(f"path:same:{note}", f"smoothed branch computed in the same UNet call ({note})")
            else:
                reason = run.why_separate
                run.say_once(f"path:separate:{reason}", f"separate extra UNet call ({reason})")
                counts.update(smoothed=0, misplaced=0)
                if run.dit is None:
                    options, smoothing = with_attn1_patches(args["model_options"], patches), nullcontext()
                else:
                    options, smoothing = args["model_options"], run.dit.hooks(run, counts)
                with smoothing:
                    cond_seg, _ = run.host.calc_cond_uncond_batch(
                        args["model"], args["cond"], None, x, args["sigma"], options
                    )
                if counts["smoothed"] == 0:
                    return result  # no layer could be smoothed on this step (said per layer): no SEG term
            # The host scales CFG by the summed AND weights when they do not sum to 1; so is SEG.
            strength = sum(item.get("strength", 1) for item in args["cond"])
            scale = run.params.scale * (1.0 if math.isclose(strength, 1.0) else strength)
            uncond = args["uncond_denoised"]
            guided = seg_guidance(result, args["cond_denoised"], cond_seg, scale, **rescale_args(run.params, uncond))
            run.note_guided()
            return guided
        except Exception as error:  # SEG must never break the user's generation
            run.give_up(f"SEG failed and is off for the rest of this generation: {error!r}")
            return result

    return post_cfg
