"""SEG on AUTOMATIC1111 1.10: the smoothed conditional branch, computed inside the host's CFG denoiser.

Flow per sampling step, for a generation with SEG on:

1. ``on_cfg_denoiser`` (registered once, stateless) finds the generation's ``SegRun`` on ``p`` and, inside
   the step window, stashes the batched inputs the host built: ``x_in``, ``sigma_in``, ``image_cond_in`` and
   the cond rows. It wraps ``combine_denoised`` on that denoiser *instance* and, for the fast path, the
   ``forward`` of the sampler's model wrapper (both live for one sampling pass, so the wrappers die with it).
2. Fast path (the UNet runs the stock ldm/sgm forward): the host's own model call gets copies of the cond
   rows appended; for the duration of that call only, the UNet's forward is the forked forward
   (``host/fork.py``), which computes those rows from the first SEG block on, their queries smoothed. The
   host gets its usual rows back; the copies are the smoothed branch, ``cond_seg``.
   Behind sd-webui-controlnet's forward, which runs the blocks itself, the forward only watches the host's
   rows and then runs the copies from the first SEG block on, with the cond rows' control
   (``host/tail_fork.py``). Which path a step takes: ``a1111_paths.py``; the call that carries it out:
   ``a1111_same_call.py``.
3. Otherwise (another forward: TensorRT, another extension's wrapper; or the host split the rows over
   several calls) one cond-only UNet call runs after the host's, with the queries smoothed; behind a
   wrapper that keeps state for the host's batch (ControlNet), the host's call is repeated instead.
4. In the wrapped ``combine_denoised`` the host's CFG result is computed first, then
   ``cfg_result + scale * (cond - cond_seg)`` is returned, AND-prompt weights applied. Inpaint blending,
   previews and ``on_cfg_after_cfg`` then see the guided result, exactly as they see plain CFG
   (``a1111_guidance.py``).

Query hooks (``a1111_smoothing.py``) and the forked forward exist only during one call (try/finally), so an
error, an interrupt or a skipped job leaves nothing behind. This module holds the generation's run: its
state, the step's entry, and what those modules share (the console line of the separate pass, the
selected layers, their query hooks).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from seg_lib.core.guidance import in_step_window
from seg_lib.host.a1111_guidance import wrap_combine
from seg_lib.host.a1111_host import Host
from seg_lib.host.a1111_others import seg_blocker
from seg_lib.host.a1111_paths import plan_step
from seg_lib.host.a1111_same_call import Plan
from seg_lib.host.a1111_smoothing import Targets, layer_targets, query_smoothing
from seg_lib.host.run import Run


@dataclass
class SegRun(Run):
    """One generation's SEG state on A1111."""

    host: Host = field(default_factory=Host)
    stash: Any = None  # this step's CFGDenoiserParams: the host reads its inputs back from it too
    _targets: dict[tuple[int, str], Targets | None] = field(default_factory=dict)
    plan: Plan | None = None  # armed for the host's next model call of this step
    cond_seg: torch.Tensor | None = None  # the smoothed branch the fast path computed this step
    call_state: Any = None  # other extensions' per-call state before the host's call of this step
    forking: str = "no"  # this step's fork: "no", "armed" (a missing cond_seg then means split rows), "ran"
    no_tail: str = ""  # why the branch could not follow ControlNet's forward: the next steps repeat the call

    def on_denoiser(self, params: Any) -> None:
        """``on_cfg_denoiser``: remember this step's inputs when SEG runs at this step."""
        self.stash, self.plan, self.cond_seg, self.forking = None, None, None, "no"
        if self.failed or not in_step_window(
            params.sampling_step, params.total_sampling_steps, self.params.start, self.params.end
        ):
            return
        blocker = seg_blocker(self.host.unet()) if self.host.unet() is not None else None
        if blocker is not None:
            self.give_up(f"SEG is off for this generation: {blocker}")
            return
        wrap_combine(self, params.denoiser)
        self.stash, self.call_state = params, self.host.call_state()
        try:
            self.plan = plan_step(self, params)
            self.forking = "no" if self.plan is None else "armed"
        except Exception as error:  # the fast path is an optimisation: never let it stop SEG
            self.say_once("path:plan-error", f"fast path unavailable ({error!r}); separate extra UNet pass")

    def plain_path(self, reason: str) -> None:
        """The console line, once per reason, of a step whose branch takes an extra UNet call of its own."""
        self.say_once(f"path:plain:{reason}", f"separate extra UNet pass per step ({reason})")

    def targets_for(self, unet: nn.Module | None) -> Targets | None:
        """The selected layers of ``unet`` (``a1111_smoothing.layer_targets``), resolved once per UNet."""
        key = (id(unet), self.params.layers)  # the hires pass may select other layers
        if key not in self._targets:
            self._targets[key] = layer_targets(self, unet)
        return self._targets[key]

    def smoothing(
        self, targets: Targets, blurred: list[int], rows: slice | None = None
    ) -> contextlib.AbstractContextManager[None]:
        """The query hooks of one UNet call (``a1111_smoothing.query_smoothing``)."""
        return query_smoothing(self, targets, blurred, rows, self.host.token_regrouping())
