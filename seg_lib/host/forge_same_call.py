"""Forge's same-call path: the smoothed rows ride in the host's own cond/uncond UNet call.

When the step is armed (``ForgeRun.arm``), SEG's ``model_function_wrapper`` appends a copy of the cond chunk's
rows to the host's call, marks them as the only rows to smooth, and keeps their output for the post-CFG
function. When the UNet runs a stock forward SEG knows, the copies are forked at the first selected block
(``forge_fork.py``). Anything it cannot vouch for leaves the call as the host made it, with the reason kept
for the console; the step then takes the separate call.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from seg_lib.host import forge_fork
from seg_lib.host.forge_patches import SMOOTH_ROWS, with_attn1
from seg_lib.host.marks import owned

if TYPE_CHECKING:
    from seg_lib.host.forge import ForgeRun

COND = 0  # Forge's mark for a cond chunk in ``cond_or_uncond`` (uncond is 1)


def is_batch(value: Any, rows: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows


def model_function_wrapper(run: ForgeRun, previous: Any, patches: dict, counts: dict[str, int]) -> Any:
    """SEG's UNet function wrapper, chaining ``previous`` (the one that was there: it sees SEG's rows)."""
    chained = {"previous": previous}

    def call(apply_model: Any, args: dict[str, Any]) -> torch.Tensor:
        if chained["previous"] is not None:
            return chained["previous"](apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    @owned
    def wrapper(apply_model: Any, args: dict[str, Any]) -> torch.Tensor:
        if not run.armed or COND not in args["cond_or_uncond"]:
            return call(apply_model, args)
        # Only the step's own cond/uncond call: other extensions' extra passes later in the step
        # (a post-CFG guidance calling calc_cond_uncond_batch) must stay as they are.
        run.armed = False
        output = enlarged = None
        try:
            plan = fork_plan(run, apply_model, args) if run.dit is None else None
            enlarged = enlarge(run, apply_model, args, patches, forge_fork.CARRIED if plan else ())
            if enlarged is not None:
                counts.update(smoothed=0, misplaced=0)
                with forge_fork.forked(plan) if run.dit is None else dit_fork(run, args, counts):
                    output = call(apply_model, enlarged)
                if output.shape[0] != enlarged["input"].shape[0]:
                    raise ValueError(f"the UNet returned {output.shape[0]} rows for {enlarged['input'].shape[0]}")
        except Exception as error:
            # Extensions that rebuild the batch per cond_or_uncond entry from all cond rows (Forge's
            # Reference and StyleAlign) cannot take a second cond chunk; the separate call still works.
            run.same_call_failed = True
            run.why_separate = "the same-call path failed earlier in this generation"
            run.say_once("same-call-failed", f"the same-call path failed ({error!r}); using a separate call")
            output = None
        enlarged = None  # the bigger batch's tensors go before the host's own call may run again
        if output is None:
            return call(apply_model, args)
        rows = args["input"].shape[0]
        if counts["smoothed"] and not counts["misplaced"]:
            run.cond_seg = output[rows:].to(args["input"].dtype)
        elif counts["misplaced"]:
            run.why_separate = "another UNet wrapper regroups the batch rows"
        else:
            run.nothing_smoothed = True  # each layer said why; a separate call would skip them too
        return output[:rows]

    def to(*args: Any, **kwargs: Any) -> Any:
        # The host's model_patches_to moves a wrapper that has .to; pass that on to the chained one.
        if hasattr(chained["previous"], "to"):
            chained["previous"] = chained["previous"].to(*args, **kwargs)
        return wrapper

    wrapper.to = to
    wrapper.seg_previous = lambda: chained["previous"]  # what forge_others checks behind ours
    return wrapper


def dit_fork(run: ForgeRun, args: dict[str, Any], counts: dict[str, int]) -> Any:
    """A DiT's smoothed rows in the bigger call, forked from the cond chunk at the first selected block."""
    assert run.dit is not None
    rows = args["input"].shape[0]
    size = rows // len(args["cond_or_uncond"])
    first = list(args["cond_or_uncond"]).index(COND) * size
    run.fork_note = run.dit.fork_note
    fork = None if run.dit.buffers else slice(first, first + size)  # unforked: the copies run the whole model
    return run.dit.hooks(run, counts, rows=rows, fork=fork)


def fork_plan(run: ForgeRun, apply_model: Any, args: dict[str, Any]) -> forge_fork.ForkPlan | None:
    """The fork for this call (the branch computed from the first selected block on), or None with the
    reason kept for the console: the copies then run through the whole UNet, or the separate call."""
    unet = getattr(getattr(apply_model, "__self__", None), "diffusion_model", None)
    cond_or_uncond = list(args["cond_or_uncond"])
    size = args["input"].shape[0] // max(len(cond_or_uncond), 1)
    if not run.host.unet_forwards or cond_or_uncond.count(COND) != 1 or unet is None:
        run.fork_note = f"not forked: {run.host.not_forked or 'no known UNet forward'}"
        return None
    first = cond_or_uncond.index(COND) * size
    plan = forge_fork.plan_fork(
        unet, run.host.unet_forwards, run.fork_at, args, slice(first, first + size), (SMOOTH_ROWS,)
    )
    if isinstance(plan, str):
        run.fork_note = f"not forked: {plan}"
        return None
    part, index = run.fork_at
    run.fork_note = f"forked from the conditional branch at {part} block {index}"
    return plan


def enlarge(
    run: ForgeRun, apply_model: Any, args: dict[str, Any], patches: dict, carried: tuple[str, ...] = ()
) -> dict[str, Any] | None:
    """The wrapper's args with a copy of the cond chunk's rows appended and marked for smoothing, or None
    (with the reason kept for the console) when this call cannot carry them."""
    x, timestep, c = args["input"], args["timestep"], args["c"]
    cond_or_uncond = list(args["cond_or_uncond"])
    rows = x.shape[0]
    size = rows // len(cond_or_uncond)
    if cond_or_uncond.count(COND) != 1 or size * len(cond_or_uncond) != rows:
        run.why_separate = "the UNet call holds several cond chunks"
        return None
    if (size, *x.shape[1:]) != run.step_shape or not is_batch(timestep, rows):
        run.why_separate = "the UNet call's rows are not the step's latents"
        return None
    # Only tensors with a row per batch row can be extended; ControlNet's control (a dict of lists)
    # and anything unknown cannot, unless the fork carries it (``carried``).
    other = sorted(
        key
        for key, value in c.items()
        if key != "transformer_options" and key not in carried and not is_batch(value, rows)
    )
    if other:
        run.why_separate = f"the UNet call carries {', '.join(map(repr, other))} (ControlNet?)"
        return None
    # The host's batching test, for the bigger call: its conds' shapes per chunk, one chunk more.
    chunks = len(cond_or_uncond) + 1
    cond_shapes = {
        key: [torch.Size((size, *value.shape[1:]))] * chunks for key, value in c.items() if is_batch(value, rows)
    }
    if run.host.conventions.batch is None:
        run.why_separate = "this WebUI batches its conds by a test SEG does not know"
        return None
    if not run.host.fits(getattr(apply_model, "__self__", None), (rows + size, *x.shape[1:]), x.device, cond_shapes):
        run.why_separate = "not enough free memory for the bigger batch"
        return None
    first = cond_or_uncond.index(COND) * size
    cond_rows = slice(first, first + size)

    def grow(tensor: torch.Tensor) -> torch.Tensor:
        return torch.cat([tensor, tensor[cond_rows]])

    enlarged_c = {key: grow(value) if is_batch(value, rows) else value for key, value in c.items()}
    enlarged_c["transformer_options"] = enlarged_options(c.get("transformer_options", {}), patches, rows, size, first)
    return {"input": grow(x), "timestep": grow(timestep), "c": enlarged_c, "cond_or_uncond": [*cond_or_uncond, COND]}


def enlarged_options(transformer_options: dict[str, Any], patches: dict, rows: int, size: int, first: int) -> dict:
    """A copy of the call's transformer_options for the bigger batch: our patches, the marker for the
    appended rows, and the host's per-row bookkeeping extended with one more cond chunk (IP-Adapter,
    Reference and StyleAlign index rows by it; reForge keeps one uuid per chunk)."""
    options = with_attn1(transformer_options, patches)
    options[SMOOTH_ROWS] = slice(rows, rows + size)
    chunk = first // size
    if isinstance(options.get("cond_or_uncond"), list):
        options["cond_or_uncond"] = [*options["cond_or_uncond"], COND]
    uuids = options.get("uuids")
    if isinstance(uuids, list) and chunk < len(uuids):
        options["uuids"] = [*uuids, uuids[chunk]]
    mark = options.get("cond_mark")
    if is_batch(mark, rows):
        options["cond_mark"] = torch.cat([mark, mark.new_zeros(size)])  # 0 marks cond rows
    if isinstance(options.get("cond_indices"), list):
        options["cond_indices"] = [*options["cond_indices"], *range(rows, rows + size)]
    return options
