"""SEG on Forge, through Forge's own UNet patcher (new Forge ``backend/`` and the ``ldm_patched`` family).

Per sampling pass (``process_before_every_sampling``), the pass's UNet patcher is cloned and given a
post-CFG function that returns ``cfg_result + scale * (cond - cond_seg)``, where ``cond_seg`` is the
conditional branch run with ``attn1`` replace patches on the selected transformer blocks (the queries
smoothed, then the attention that would have run there: another extension's replace patch on that layer,
else the host's attention function). ``cond_seg`` comes from one of two paths:

- same call (the fast path, Settings > Smoothed Energy Guidance): a pre-CFG function arms a
  ``model_function_wrapper`` for the step when the step is simple (one cond entry, no area or mask);
  the wrapper appends a copy of the cond chunk's rows to the host's own cond/uncond UNet call, marks
  them as the only rows to smooth, and keeps their output for the post-CFG function. When the UNet runs
  Forge's stock forward, the copies are forked at the first selected block (``forge_fork.py``: the
  encoder runs once; ControlNet's residuals are carried to them). Anything it cannot vouch for
  (ControlNet's ``control`` without the fork, too little free memory, a wrapper that splits the batch)
  leaves the call alone;
- separate call: the post-CFG function runs the conditional branch once more through the host's
  ``calc_cond_uncond_batch``, every row smoothed.

Forge rebuilds its UNet patcher from the LoRA-applied one before every sampling pass, so nothing outlives
the pass; the hires pass's double call is absorbed by recognising our own clone.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch

from seg_lib.core.blocks import LayerRef
from seg_lib.core.blur import is_infinite
from seg_lib.core.guidance import in_step_window, needs_uncond, rescale_args, seg_guidance
from seg_lib.host import forge_fork
from seg_lib.host.forge_others import same_call_blockers
from seg_lib.host.fork import first_block
from seg_lib.host.marks import owned
from seg_lib.host.one_query import one_query_attention
from seg_lib.host.run import Run
from seg_lib.settings import fast_path_enabled

COND = 0  # Forge's mark for a cond chunk in ``cond_or_uncond`` (uncond is 1)
# transformer_options key: the batch rows SEG's attn1 patches smooth, as ``slice(first, rows)`` (``rows``
# is the batch the marker was written for; None: whatever the batch). Without it the patches smooth nothing.
SMOOTH_ROWS = "seg_smooth_rows"
# transformer_options key: (height, width) of the hidden state entering the current SpatialTransformer,
# written by SEG's block inner modifier just before it runs (the layer's real token grid).
GRID = "seg_grid"
ALL_ROWS = slice(0, None)
# Cond entry keys that make the step's cond rows not a plain copy of the latents (regional prompting, or
# a cond that may skip the call): the same-call path leaves those steps alone.
_NOT_SIMPLE = ("area", "mask", "timestep_start", "timestep_end")
_WRAPPER_MISSED = "the UNet call did not go through SEG's wrapper"


def _with_attn1(transformer_options: dict[str, Any], patches: dict[tuple[str, int, int], Any]) -> dict[str, Any]:
    """A copy of ``transformer_options`` with ``attn1`` replace patches added. A patch another extension has
    on the same layer (Forge looks up ``(part, index, transformer)``, then ``(part, index)``) is handed to
    ours as ``inner``, so it still runs on every row (SAG records its attention map there)."""
    options = dict(transformer_options)
    replace = dict(options.get("patches_replace", {}))
    attn1 = dict(replace.get("attn1", {}))
    for key, patch in patches.items():
        inner = attn1.get(key, attn1.get(key[:2]))
        attn1[key] = patch if inner is None else functools.partial(patch, inner=inner)
    replace["attn1"] = attn1
    options["patches_replace"] = replace
    return options


def with_attn1_patches(
    model_options: dict[str, Any], patches: dict[tuple[str, int, int], Any], rows: slice | None = ALL_ROWS
) -> dict[str, Any]:
    """A copy of ``model_options`` with ``attn1`` replace patches added and ``rows`` marked for smoothing
    (None: no marker); the original is left alone."""
    options = dict(model_options)
    transformer_options = _with_attn1(options.get("transformer_options", {}), patches)
    if rows is not None:
        transformer_options[SMOOTH_ROWS] = rows
    options["transformer_options"] = transformer_options
    return options


def _is_batch(value: Any, rows: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows


@dataclass
class ForgeHost:
    """The host pieces the adapter uses (tests pass stand-ins)."""

    calc_cond_uncond_batch: Any
    attention: Any  # attention(q, k, v, heads) -> [B, N, heads * dim_head]
    free_memory: Any = None  # free_memory(device) -> bytes: the host's memory management; None: never enlarge
    opts: Any = None  # the WebUI's shared.opts
    unet_forwards: Any = None  # {the host's stock UNet forward: its family} (forge_fork.py); None: never fork

    @staticmethod
    def load(host: str) -> ForgeHost:
        from modules.shared import opts

        if host == "forge":
            from backend import memory_management
            from backend.attention import attention_function
            from backend.sampling.sampling_function import calc_cond_uncond_batch

            forwards = forge_fork.stock_forwards(host)
            return ForgeHost(
                calc_cond_uncond_batch, attention_function, memory_management.get_free_memory, opts, forwards
            )
        from ldm_patched.ldm.modules.attention import optimized_attention
        from ldm_patched.modules import model_management
        from ldm_patched.modules.samplers import calc_cond_uncond_batch

        forwards = forge_fork.stock_forwards(host)
        return ForgeHost(calc_cond_uncond_batch, optimized_attention, model_management.get_free_memory, opts, forwards)

    def fast_path(self) -> bool:
        return fast_path_enabled(self.opts)

    def fits(self, model: Any, shape: tuple[int, ...], device: torch.device) -> bool:
        """Whether a UNet call on a batch of ``shape`` fits, by the test ``calc_cond_uncond_batch`` batches by."""
        if self.free_memory is None or not hasattr(model, "memory_required"):
            return False
        return model.memory_required(list(shape)) < self.free_memory(device)


@dataclass
class ForgeRun(Run):
    """One generation's SEG state on Forge."""

    host: ForgeHost | None = None
    step: int = 0
    total_steps: int = 1
    armed: bool = False  # this step's next UNet call with a cond chunk may carry the smoothed rows
    cond_seg: torch.Tensor | None = None  # those rows' output, for this step's post-CFG function
    why_separate: str = _WRAPPER_MISSED  # why this step falls back to the separate call (for the console)
    step_shape: tuple[int, ...] = ()  # the step's latent shape, as the pre-CFG function saw it
    same_call_failed: bool = False  # the bigger call raised once: the separate call for the rest of the generation
    step_params: Any = None  # this step's CFGDenoiserParams: its ``x`` is what the step's real call gets
    nothing_smoothed: bool = False  # the same call ran, but no selected layer could be smoothed this step
    fork_at: tuple[str, int] = ("input", 0)  # the first selected block: where the same call forks the branch
    fork_note: str = ""  # this step's same call: where it forked, or why not (for the console)

    def on_denoiser(self, params: Any) -> None:
        """``on_cfg_denoiser``: Forge still reports the step here, which the window needs."""
        self.step, self.total_steps = params.sampling_step, params.total_sampling_steps
        self.step_params = params

    def _is_step_call(self, x: Any) -> bool:
        """Whether a sampling call works on this step's latents. Extensions run nested sampling calls on
        other latents within a step (Reference records its style from a noised reference image); SEG must
        neither guide those nor run its extra pass inside them, which would change what they record."""
        step_x = getattr(self.step_params, "x", None)
        return step_x is None or x is step_x

    def patch(self, p: Any) -> None:
        """Install SEG on this sampling pass's UNet patcher (once per pass)."""
        objects = p.sd_model.forge_objects
        if self.failed or getattr(objects.unet, "seg_run", None) is self:
            return
        refs = self.selected_layers(getattr(objects.unet.model, "diffusion_model", None))
        if refs is None:
            return
        unet = objects.unet.clone()
        _add_block_inner_modifier(unet, _see_grid)
        self.fork_at = first_block(refs)
        counts = {"smoothed": 0, "misplaced": 0}
        patches = {(ref.part, ref.index, ref.transformer): self._attn1_patch(ref, counts) for ref in refs}
        # snf fuses the CFG term, so at CFG 1 Forge must still compute the uncond prediction
        post_cfg = self._post_cfg_function(patches, counts)
        unet.set_model_sampler_post_cfg_function(post_cfg, disable_cfg1_optimization=needs_uncond(self.params))
        self.armed, self.cond_seg = False, None
        if self.host.fast_path():
            self.why_separate = _WRAPPER_MISSED
            self._install_same_call(unet, patches, counts)
        else:
            self.why_separate = "fast path off in Settings"  # nothing else installed: the separate call only
        unet.seg_run = self
        objects.unet = unet

    def _seg_step(self, x: Any = None) -> bool:
        if self.failed or not in_step_window(self.step, self.total_steps, self.params.start, self.params.end):
            return False
        return x is None or self._is_step_call(x)

    def _install_same_call(self, unet: Any, patches: dict[tuple[str, int, int], Any], counts: dict[str, int]) -> None:
        # A closure, not the bound method: clone() deep-copies model_options, and a bound method would be
        # copied with its run (and p), leaving the copy armed instead of us.
        @owned
        def pre_cfg(model: Any, cond: Any, uncond: Any, x: Any, timestep: Any, model_options: Any) -> tuple:
            return self._pre_cfg(model, cond, uncond, x, timestep, model_options)

        add_pre_cfg = getattr(unet, "add_sampler_pre_cfg_function", None)
        if add_pre_cfg is not None:
            add_pre_cfg(pre_cfg)
        else:  # both families' samplers read this list; only the helper's name may be missing
            options = unet.model_options
            options["sampler_pre_cfg_function"] = [*options.get("sampler_pre_cfg_function", []), pre_cfg]
        # Chain whatever wrapper is there, so the extension that set it keeps working (it sees our rows).
        previous = unet.model_options.get("model_function_wrapper")
        unet.set_model_unet_function_wrapper(self._model_function_wrapper(previous, patches, counts))

    def _pre_cfg(self, model: Any, cond: Any, uncond: Any, x: Any, timestep: Any, model_options: Any) -> tuple:
        """``sampler_pre_cfg_function``: decide, per step, whether the host's call may carry the smoothed rows."""
        self.armed, self.cond_seg, self.nothing_smoothed = False, None, False
        if self._seg_step(x):
            self.why_separate = _WRAPPER_MISSED
            blockers = same_call_blockers(model_options, own_keys=(GRID, SMOOTH_ROWS))
            if blockers:
                self.why_separate = blockers[0]
            elif len(cond) != 1:
                self.why_separate = "the prompt has several AND parts"
            elif any(key in cond[0] for key in _NOT_SIMPLE):
                self.why_separate = "regional (area/mask) conditioning"
            elif self.same_call_failed:
                self.why_separate = "the same-call path failed earlier in this generation"
            else:
                self.armed, self.step_shape = True, tuple(x.shape)
        return model, cond, uncond, x, timestep, model_options

    def _model_function_wrapper(
        self, previous: Any, patches: dict[tuple[str, int, int], Any], counts: dict[str, int]
    ) -> Any:
        chained = {"previous": previous}

        def call(apply_model: Any, args: dict[str, Any]) -> torch.Tensor:
            if chained["previous"] is not None:
                return chained["previous"](apply_model, args)
            return apply_model(args["input"], args["timestep"], **args["c"])

        @owned
        def wrapper(apply_model: Any, args: dict[str, Any]) -> torch.Tensor:
            if not self.armed or COND not in args["cond_or_uncond"]:
                return call(apply_model, args)
            # Only the step's own cond/uncond call: other extensions' extra passes later in the step
            # (a post-CFG guidance calling calc_cond_uncond_batch) must stay as they are.
            self.armed = False
            output = enlarged = None
            try:
                plan = self._fork_plan(apply_model, args)
                enlarged = self._enlarged(apply_model, args, patches, forge_fork.CARRIED if plan else ())
                if enlarged is not None:
                    counts.update(smoothed=0, misplaced=0)
                    with forge_fork.forked(plan):
                        output = call(apply_model, enlarged)
                    if output.shape[0] != enlarged["input"].shape[0]:
                        raise ValueError(f"the UNet returned {output.shape[0]} rows for {enlarged['input'].shape[0]}")
            except Exception as error:
                # Extensions that rebuild the batch per cond_or_uncond entry from all cond rows (Forge's
                # Reference and StyleAlign) cannot take a second cond chunk; the separate call still works.
                self.same_call_failed = True
                self.why_separate = "the same-call path failed earlier in this generation"
                self.say_once("same-call-failed", f"the same-call path failed ({error!r}); using a separate call")
                output = None
            enlarged = None  # the bigger batch's tensors go before the host's own call may run again
            if output is None:
                return call(apply_model, args)
            rows = args["input"].shape[0]
            if counts["smoothed"] and not counts["misplaced"]:
                self.cond_seg = output[rows:].to(args["input"].dtype)
            elif counts["misplaced"]:
                self.why_separate = "another UNet wrapper regroups the batch rows"
            else:
                self.nothing_smoothed = True  # each layer said why; a separate call would skip them too
            return output[:rows]

        def to(*args: Any, **kwargs: Any) -> Any:
            # The host's model_patches_to moves a wrapper that has .to; pass that on to the chained one.
            if hasattr(chained["previous"], "to"):
                chained["previous"] = chained["previous"].to(*args, **kwargs)
            return wrapper

        wrapper.to = to
        wrapper.seg_previous = lambda: chained["previous"]  # what forge_others checks behind ours
        return wrapper

    def _fork_plan(self, apply_model: Any, args: dict[str, Any]) -> forge_fork.ForkPlan | None:
        """The fork for this call (the branch computed from the first selected block on), or None with the
        reason kept for the console: the copies then run through the whole UNet, or the separate call."""
        unet = getattr(getattr(apply_model, "__self__", None), "diffusion_model", None)
        cond_or_uncond = list(args["cond_or_uncond"])
        size = args["input"].shape[0] // max(len(cond_or_uncond), 1)
        if not self.host.unet_forwards or cond_or_uncond.count(COND) != 1 or unet is None:
            self.fork_note = "not forked: no known UNet forward"
            return None
        first = cond_or_uncond.index(COND) * size
        plan = forge_fork.plan_fork(
            unet, self.host.unet_forwards, self.fork_at, args, slice(first, first + size), (SMOOTH_ROWS,)
        )
        if isinstance(plan, str):
            self.fork_note = f"not forked: {plan}"
            return None
        part, index = self.fork_at
        self.fork_note = f"forked from the conditional branch at {part} block {index}"
        return plan

    def _enlarged(
        self,
        apply_model: Any,
        args: dict[str, Any],
        patches: dict[tuple[str, int, int], Any],
        carried: tuple[str, ...] = (),
    ) -> dict[str, Any] | None:
        """The wrapper's args with a copy of the cond chunk's rows appended and marked for smoothing, or None
        (with the reason kept for the console) when this call cannot carry them."""
        x, timestep, c = args["input"], args["timestep"], args["c"]
        cond_or_uncond = list(args["cond_or_uncond"])
        rows = x.shape[0]
        size = rows // len(cond_or_uncond)
        if cond_or_uncond.count(COND) != 1 or size * len(cond_or_uncond) != rows:
            self.why_separate = "the UNet call holds several cond chunks"
            return None
        if (size, *x.shape[1:]) != self.step_shape or not _is_batch(timestep, rows):
            self.why_separate = "the UNet call's rows are not the step's latents"
            return None
        # Only tensors with a row per batch row can be extended; ControlNet's control (a dict of lists)
        # and anything unknown cannot, unless the fork carries it (``carried``).
        other = sorted(
            key
            for key, value in c.items()
            if key != "transformer_options" and key not in carried and not _is_batch(value, rows)
        )
        if other:
            self.why_separate = f"the UNet call carries {', '.join(map(repr, other))} (ControlNet?)"
            return None
        if not self.host.fits(getattr(apply_model, "__self__", None), (rows + size, *x.shape[1:]), x.device):
            self.why_separate = "not enough free memory for the bigger batch"
            return None
        first = cond_or_uncond.index(COND) * size
        cond_rows = slice(first, first + size)

        def grow(tensor: torch.Tensor) -> torch.Tensor:
            return torch.cat([tensor, tensor[cond_rows]])

        enlarged_c = {key: grow(value) if _is_batch(value, rows) else value for key, value in c.items()}
        enlarged_c["transformer_options"] = self._enlarged_options(
            c.get("transformer_options", {}), patches, rows, size
        )
        return {
            "input": grow(x),
            "timestep": grow(timestep),
            "c": enlarged_c,
            "cond_or_uncond": [*cond_or_uncond, COND],
        }

    @staticmethod
    def _enlarged_options(
        transformer_options: dict[str, Any], patches: dict[tuple[str, int, int], Any], rows: int, size: int
    ) -> dict[str, Any]:
        """A copy of the call's transformer_options for the bigger batch: our patches, the marker for the
        appended rows, and the host's per-row bookkeeping extended with one more cond chunk (IP-Adapter,
        Reference and StyleAlign index rows by it)."""
        options = _with_attn1(transformer_options, patches)
        options[SMOOTH_ROWS] = slice(rows, rows + size)
        if isinstance(options.get("cond_or_uncond"), list):
            options["cond_or_uncond"] = [*options["cond_or_uncond"], COND]
        mark = options.get("cond_mark")
        if _is_batch(mark, rows):
            options["cond_mark"] = torch.cat([mark, mark.new_zeros(size)])  # 0 marks cond rows
        if isinstance(options.get("cond_indices"), list):
            options["cond_indices"] = [*options["cond_indices"], *range(rows, rows + size)]
        return options

    def _post_cfg_function(self, patches: dict[tuple[str, int, int], Any], counts: dict[str, int]) -> Any:
        @owned
        def post_cfg(args: dict[str, Any]) -> torch.Tensor:
            result = args["denoised"]
            if not self._is_step_call(args["input"]):
                return result  # a nested call of another extension: nothing of this step's is consumed
            cond_seg, self.cond_seg, self.armed = self.cond_seg, None, False
            nothing_smoothed, self.nothing_smoothed = self.nothing_smoothed, False
            if not self._seg_step() or nothing_smoothed:
                return result
            try:
                if cond_seg is not None and cond_seg.shape == args["cond_denoised"].shape:
                    note = self.fork_note
                    self.say_once(f"path:same:{note}", f"smoothed branch computed in the same UNet call ({note})")
                else:
                    reason = self.why_separate
                    self.say_once(f"path:separate:{reason}", f"separate extra UNet call ({reason})")
                    counts.update(smoothed=0, misplaced=0)
                    options = with_attn1_patches(args["model_options"], patches)
                    cond_seg, _ = self.host.calc_cond_uncond_batch(
                        args["model"], args["cond"], None, args["input"], args["sigma"], options
                    )
                    if counts["smoothed"] == 0:
                        return result  # no layer could be smoothed on this step (said per layer): no SEG term
                # The host scales CFG by the summed AND weights when they do not sum to 1; so is SEG.
                strength = sum(item.get("strength", 1) for item in args["cond"])
                scale = self.params.scale * (1.0 if math.isclose(strength, 1.0) else strength)
                uncond = args["uncond_denoised"]
                return seg_guidance(result, args["cond_denoised"], cond_seg, scale, **rescale_args(self.params, uncond))
            except Exception as error:  # SEG must never break the user's generation
                self.give_up(f"SEG failed and is off for the rest of this generation: {error!r}")
                return result

        return post_cfg

    def _attn1_patch(self, ref: LayerRef, counts: dict[str, int]) -> Any:
        @owned
        def attn1(
            q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict[str, Any], inner: Any = None
        ) -> torch.Tensor:
            rows = extra_options.get(SMOOTH_ROWS)
            if rows is not None and rows.stop not in (None, q.shape[0]):
                counts["misplaced"] += 1  # a wrapper regrouped the batch: the marked rows are not these
            elif rows is not None:
                smoothed = self.smoothed(ref, q[rows], extra_options.get(GRID), _regrouping_hint(extra_options))
                if smoothed is not None and inner is None and is_infinite(self.params.blur_sigma):
                    counts["smoothed"] += 1  # one mean query per row: attention for one query, broadcast
                    heads = extra_options["n_heads"]
                    return one_query_attention(self.host.attention, q, k, v, heads, rows, smoothed[:, :1])
                if smoothed is not None:
                    # The marked rows run to the end of the batch; a new tensor, the host's q stays as it was.
                    q = torch.cat([q[: rows.start], smoothed]) if rows.start else smoothed
                    counts["smoothed"] += 1
            if inner is not None:  # the attention the host would have run here
                return inner(q, k, v, extra_options)
            return self.host.attention(q, k, v, extra_options["n_heads"])

        return attn1


@owned
def _see_grid(x: Any, flag: str, layer: Any, layer_index: int, sequence: Any, transformer_options: dict) -> Any:
    """Block inner modifier: record the spatial shape of the hidden state entering each SpatialTransformer,
    which is the token grid its attention layers see in this call (Deep Shrink, tiles, hires passes)."""
    if flag == "before" and type(layer).__name__ == "SpatialTransformer" and getattr(x, "ndim", 0) == 4:
        transformer_options[GRID] = tuple(x.shape[-2:])
    return x


def _add_block_inner_modifier(unet: Any, modifier: Any) -> None:
    add = getattr(unet, "add_block_inner_modifier", None)
    if add is not None:
        add(modifier)
        return
    options = unet.model_options.setdefault("transformer_options", {})  # both families read this list
    options["block_inner_modifiers"] = [*options.get("block_inner_modifiers", []), modifier]


def _regrouping_hint(extra_options: dict[str, Any]) -> str:
    """What likely split or merged a layer's tokens, from the patches in the call (for the console line)."""
    patches = extra_options.get("patches") or {}
    if "attn1_patch" in patches:
        return "token merging?"
    return ""
