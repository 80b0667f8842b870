"""SEG's term on A1111: added in the host's ``combine_denoised``, after its CFG result.

The smoothed branch is the one the host's call carried (``run.cond_seg``, from ``a1111_same_call.py``) or,
when it carried none, one cond-only UNet call after the host's, with the queries smoothed: the separate
extra pass. Inpaint blending, previews and ``on_cfg_after_cfg`` then see the guided result, exactly as they
see plain CFG.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch

from seg_lib.core.guidance import cond_weights, rescale_args, seg_guidance
from seg_lib.host.a1111_host import cond_rows, make_condition, match_host_padding

if TYPE_CHECKING:
    from seg_lib.host.a1111 import SegRun


def wrap_combine(run: SegRun, denoiser: Any) -> None:
    """Wrap ``combine_denoised`` (and its edit-model twin) on this denoiser instance, once per run."""
    if getattr(denoiser, "seg_wrapped_by", None) is run:
        return
    plain = denoiser.combine_denoised
    for_edit = denoiser.combine_denoised_for_edit_model

    @functools.wraps(plain)
    def combine_denoised(x_out: torch.Tensor, conds_list: Any, uncond: Any, cond_scale: float) -> torch.Tensor:
        result = plain(x_out, conds_list, uncond, cond_scale)
        return guide(run, denoiser, result, x_out, conds_list)

    @functools.wraps(for_edit)
    def combine_denoised_for_edit_model(x_out: torch.Tensor, cond_scale: float) -> torch.Tensor:
        result = for_edit(x_out, cond_scale)
        return guide(run, denoiser, result, x_out, None)

    denoiser.combine_denoised = combine_denoised
    denoiser.combine_denoised_for_edit_model = combine_denoised_for_edit_model
    denoiser.seg_wrapped_by = run


def guide(run: SegRun, denoiser: Any, result: torch.Tensor, x_out: torch.Tensor, conds_list: Any) -> torch.Tensor:
    """The host's CFG ``result`` plus ``scale * (cond - cond_seg)``, AND-prompt weights applied."""
    stash, run.stash = run.stash, None
    cond_seg, run.cond_seg = run.cond_seg, None
    forking, run.forking, run.plan = run.forking, "no", None
    if stash is None or run.failed:
        return result
    try:
        rows = cond_rows(stash.text_cond)
        if cond_seg is not None and cond_seg.shape != x_out[:rows].shape:
            cond_seg = None  # the host's calls were not whole images (tiles): the forked rows are not cond_seg
            run.plain_path("the host's model calls work on tiles")
        elif cond_seg is None and forking == "ran":
            return result  # the fork ran, but no selected layer could be smoothed on this step
        elif cond_seg is None and forking == "armed":
            run.plain_path("the host split this step's rows over several calls")
        if cond_seg is None:
            cond_seg = extra_pass(run, denoiser, stash, rows)
        if cond_seg is None:
            return result
        weights = None
        if conds_list is not None and not all(pairs == [(i, 1.0)] for i, pairs in enumerate(conds_list)):
            weights = cond_weights(conds_list, rows, dtype=result.dtype, device=result.device)
        uncond = x_out[-result.shape[0] :]  # the host's uncond rows (snf rescale reads them)
        guided = seg_guidance(
            result, x_out[:rows], cond_seg, run.params.scale, weights, **rescale_args(run.params, uncond)
        )
        run.note_guided()
        return guided
    except Exception as error:  # SEG must never break the user's generation
        run.give_up(f"SEG failed and is off for the rest of this generation: {error!r}")
        return result


def extra_pass(run: SegRun, denoiser: Any, stash: Any, rows: int) -> torch.Tensor | None:
    """The separate extra pass: the cond rows alone through the host's inner model, their queries smoothed."""
    targets = run.targets_for(run.host.unet())
    if targets is None:
        return None
    text_cond = match_host_padding(run.host, denoiser, stash.text_cond, stash.text_uncond)
    blurred = [0]
    with run.host.extra_call(run.call_state), run.smoothing(targets, blurred):
        cond_seg = denoiser.inner_model(
            stash.x[:rows],
            stash.sigma[:rows],
            cond=make_condition(text_cond, stash.image_cond[:rows], run.host.conditioning_key()),
        )
    if blurred[0] == 0:
        return None  # no selected layer could be smoothed on this step (said per layer): no SEG term
    return cond_seg
