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
   (``host/tail_fork.py``).
3. Otherwise (another forward: TensorRT, another extension's wrapper; or the host split the rows over
   several calls) one cond-only UNet call runs after the host's, with the queries smoothed; behind a
   wrapper that keeps state for the host's batch (ControlNet), the host's call is repeated instead.
4. In the wrapped ``combine_denoised`` the host's CFG result is computed first, then
   ``cfg_result + scale * (cond - cond_seg)`` is returned, AND-prompt weights applied. Inpaint blending,
   previews and ``on_cfg_after_cfg`` then see the guided result, exactly as they see plain CFG.

Query hooks and the forked forward exist only during one call (try/finally), so an error, an interrupt or
a skipped job leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from seg_lib.core.guidance import cond_weights, in_step_window, rescale_args, seg_guidance
from seg_lib.host.a1111_host import Host, cond_rows, make_condition, match_host_padding
from seg_lib.host.a1111_others import controlnet_forward, fork_blocker, idle_forward, seg_blocker
from seg_lib.host.a1111_smoothing import Target, Targets, query_smoothing
from seg_lib.host.fork import NotRows, StockForward, first_block, forked_forward, stock_forward, with_row_copies
from seg_lib.host.run import Run
from seg_lib.host.tail_fork import NotTail, host_output_matches, recording, tail_forward
from seg_lib.host.unet_layout import attn1_module, spatial_transformer
from seg_lib.settings import fast_path_enabled


@dataclass(frozen=True)
class _Fork:
    """This step's plan for the fast path: fork ``rows`` cond rows at block ``at`` of ``unet``."""

    unet: nn.Module
    stock: StockForward
    at: tuple[str, int]
    rows: int
    batches: tuple[int, ...]  # the host call sizes that hold every cond row first: all rows, or cond only
    targets: Targets


@dataclass(frozen=True)
class _Tail:
    """This step's plan behind ControlNet's forward: watch the host's call, then run the branch from ``at``."""

    unet: nn.Module
    at: tuple[str, int]
    rows: int
    batches: tuple[int, ...]
    targets: Targets


@dataclass(frozen=True)
class _Replay:
    """This step's plan when another extension owns the UNet's forward: repeat the host's call."""

    rows: int
    batches: tuple[int, ...]
    targets: Targets


@dataclass
class SegRun(Run):
    """One generation's SEG state on A1111."""

    host: Host = field(default_factory=Host)
    _stash: Any = None  # this step's CFGDenoiserParams: the host reads its inputs back from it too
    _targets: dict[tuple[int, str], Targets | None] = field(default_factory=dict)
    _fork: _Fork | _Tail | _Replay | None = None  # armed for the host's next model call of this step
    _cond_seg: torch.Tensor | None = None  # the smoothed branch the fast path computed this step
    _call_state: Any = None  # other extensions' per-call state before the host's call of this step
    _forking: str = "no"  # this step's fork: "no", "armed" (a missing cond_seg then means split rows), "ran"
    _no_tail: str = ""  # why the branch could not follow ControlNet's forward: the next steps repeat the call

    # -- host callbacks -------------------------------------------------------------------------------
    def on_denoiser(self, params: Any) -> None:
        """``on_cfg_denoiser``: remember this step's inputs when SEG runs at this step."""
        self._stash, self._fork, self._cond_seg, self._forking = None, None, None, "no"
        if self.failed or not in_step_window(
            params.sampling_step, params.total_sampling_steps, self.params.start, self.params.end
        ):
            return
        blocker = seg_blocker(self.host.unet()) if self.host.unet() is not None else None
        if blocker is not None:
            self.give_up(f"SEG is off for this generation: {blocker}")
            return
        self._wrap_combine(params.denoiser)
        self._stash, self._call_state = params, self.host.call_state()
        try:
            self._fork = self._plan_fork(params)
            self._forking = "no" if self._fork is None else "armed"
        except Exception as error:  # the fast path is an optimisation: never let it stop SEG
            self.say_once("path:plan-error", f"fast path unavailable ({error!r}); separate extra UNet pass")

    def _plain_path(self, reason: str) -> None:
        self.say_once(f"path:plain:{reason}", f"separate extra UNet pass per step ({reason})")

    def _plan_fork(self, params: Any) -> _Fork | _Tail | _Replay | None:
        unet = self.host.unet()
        targets = self._targets_for(unet)
        if targets is None:
            return None
        own = vars(unet).get("forward")
        if own is not None and not idle_forward(unet, own) and not self.host.custom_unet_active():
            return self._plan_behind(params, unet, targets)
        if not fast_path_enabled(self.host.opts()):
            self._plain_path("the fast SEG setting is off")
            return None
        stock = "a custom UNet (TensorRT?) is active" if self.host.custom_unet_active() else None
        stock = stock or stock_forward(unet, self.host.stock_forwards())
        if isinstance(stock, str):
            self._plain_path(stock)
            return None
        blocker = fork_blocker(unet)
        if blocker is not None:
            self._plain_path(blocker)
            return None
        if not self._wrap_inner(params.denoiser.inner_model):
            return None
        rows = cond_rows(params.text_cond)
        at = first_block(target.ref for target in targets)
        return _Fork(unet, stock, at, rows, (params.x.shape[0], rows), targets)

    def _plan_behind(self, params: Any, unet: nn.Module, targets: Targets) -> _Tail | _Replay | None:
        """Another extension's wrapper owns the UNet's forward (an active ControlNet unit). Such wrappers keep
        what they compute for the batch of the host's call (ControlNet caches its inpaint and reference
        latents for that batch size), so the host's call keeps its batch. Behind ControlNet's own forward the
        branch follows it from the first SEG block on (``tail_fork.py``); behind anything else, or when it
        could not, SEG's branch repeats the host's call as it was, the cond rows smoothed."""
        if not self._wrap_inner(params.denoiser.inner_model):
            return None
        rows = cond_rows(params.text_cond)
        batches = (params.x.shape[0], rows)
        why = self._tail_blocker(unet)
        if why is None:
            return _Tail(unet, first_block(target.ref for target in targets), rows, batches, targets)
        self._say_repeated(why)
        return _Replay(rows, batches, targets)

    def _cannot_follow(self) -> str:
        return f"ControlNet, and the branch cannot follow it: {self._no_tail}"

    def _say_repeated(self, why: str | None) -> None:
        self._plain_path(f"another extension wraps the UNet's forward ({why}): the host's call repeated")

    def _tail_blocker(self, unet: nn.Module) -> str | None:
        if not controlnet_forward(vars(unet)["forward"]):
            return "ControlNet?"
        if not fast_path_enabled(self.host.opts()):
            return "ControlNet; the fast SEG setting is off"
        if self._no_tail:
            return self._cannot_follow()
        if "Hypertile" in self.host.token_regrouping():  # it draws tiles per attention call: the order matters
            return "ControlNet, with Hypertile"
        blocker = fork_blocker(unet)
        return None if blocker is None else f"ControlNet, and {blocker}"

    def _wrap_inner(self, inner: Any) -> bool:
        """Route the host's model call through ``_call_with_branch`` / ``_replayed_call`` when this step's plan is
        armed; False (with the console line) when the sampler's model cannot be wrapped."""
        if not isinstance(inner, nn.Module):
            self._plain_path("the sampler's model wrapper is not a torch module")
            return False
        if getattr(inner, "seg_wrapped_by", None) is self:
            return True
        if "forward" in vars(inner) and not isinstance(getattr(inner, "seg_wrapped_by", None), SegRun):
            self._plain_path("another extension wraps the sampler's model (Tiled Diffusion?)")
            return False
        plain = inner.forward

        @functools.wraps(plain)
        def forward(*args: Any, **kwargs: Any) -> Any:
            fork, self._fork = self._fork, None  # only the step's first call can hold every cond row first
            if fork is None or self.failed or not args or args[0].shape[0] not in fork.batches:
                return plain(*args, **kwargs)
            if isinstance(fork, _Replay):
                return self._replayed_call(fork, plain, args, kwargs)
            return self._call_with_branch(fork, plain, args, kwargs)

        inner.forward = forward
        inner.seg_wrapped_by = self
        return True

    def _replayed_call(self, replay: _Replay, plain: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """The host's call, then the same call again with the cond rows (its first rows) smoothed."""
        out = plain(*args, **kwargs)
        blurred = [0]
        try:
            with (
                self.host.extra_call(self._call_state),
                self._smoothing(replay.targets, blurred, rows=slice(0, replay.rows)),
            ):
                again = plain(*args, **kwargs)
        except Exception as error:  # SEG must never break the user's generation: the host's output stands
            self.give_up(f"SEG failed and is off for the rest of this generation: {error!r}")
            return out
        self._forking = "ran"
        if blurred[0]:
            self._cond_seg = again[: replay.rows]
        return out

    def _call_with_branch(self, fork: _Fork | _Tail, plain: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """The host's call with the cond rows' copies appended, the UNet's forward replaced for its duration:
        forked (``fork.py``) or, behind ControlNet's forward, followed (``tail_fork.py``)."""
        batch = args[0].shape[0]
        try:
            more_args = with_row_copies(args, batch, fork.rows, cut=True)
            more_kwargs = with_row_copies(kwargs, batch, fork.rows, cut=True)
        except NotRows as error:
            self._forking = "no"
            self._plain_path(f"the model call has {error}")
            return plain(*args, **kwargs)

        blurred = [0]
        previous = vars(fork.unet).get("forward")  # an idle wrapper another extension keeps there stays
        if isinstance(fork, _Fork):
            fork.unet.forward = self._forked_forward(fork)
            smoothing = self._smoothing(fork.targets, blurred, rows=slice(-fork.rows, None))
        else:
            fork.unet.forward = self._followed_forward(fork, previous, blurred)
            smoothing = contextlib.nullcontext()
        try:
            with smoothing:
                out = plain(*more_args, **more_kwargs)
        except Exception as error:  # SEG must never break the user's generation: redo the host's call as is
            out = error
        finally:
            if previous is None:
                vars(fork.unet).pop("forward", None)
            else:
                fork.unet.forward = previous
        if isinstance(out, Exception):
            self.give_up(f"SEG failed and is off for the rest of this generation: {out!r}")
            return plain(*args, **kwargs)
        self._forking = "ran"
        if blurred[0]:
            part, index = fork.at
            behind = " behind ControlNet's UNet forward, with the cond rows' control" if isinstance(fork, _Tail) else ""
            if not (behind and self._no_tail):  # else the branch could not follow and the call was repeated
                self.say_once(
                    "path:fork", f"fast path, forked from the conditional branch at {part} block {index}{behind}"
                )
            self._cond_seg = out[batch:]
        # else: no selected layer could be smoothed on this step (said per layer); no SEG term this step
        return out[:batch]

    @staticmethod
    def _forked_forward(fork: _Fork) -> Callable[..., torch.Tensor]:
        def forward(x: torch.Tensor, timesteps: Any = None, context: Any = None, y: Any = None, **_: Any) -> Any:
            return forked_forward(fork.unet, fork.stock, fork.at, fork.rows, x, timesteps, context, y)

        return forward

    def _followed_forward(self, tail: _Tail, wrapper: Any, blurred: list[int]) -> Callable[..., torch.Tensor]:
        """ControlNet's forward over the host's rows, watched; then the branch's rows from ``tail.at`` on."""

        def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
            total = args[0].shape[0]

            def cut(value: Any) -> Any:
                is_rows = isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == total
                return value[: total - tail.rows] if is_rows else value

            args, kwargs = tuple(cut(v) for v in args), {k: cut(v) for k, v in kwargs.items()}
            with recording(tail.unet, tail.at, tail.rows) as rec:
                out = wrapper(*args, **kwargs)
            try:
                with self._smoothing(tail.targets, blurred):
                    branch = tail_forward(tail.unet, rec, tail.at)
                if not host_output_matches(tail.unet, rec, out[: tail.rows]):
                    raise NotTail("it changes the UNet's output after the last block")
            except NotTail as error:
                self._no_tail = str(error)
                self._say_repeated(self._cannot_follow())
                blurred[0] = 0
                rows = slice(0, tail.rows)
                with self.host.extra_call(self._call_state), self._smoothing(tail.targets, blurred, rows=rows):
                    branch = wrapper(*args, **kwargs)[rows]
            return torch.cat([out, branch])

        return forward

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
        cond_seg, self._cond_seg = self._cond_seg, None
        forking, self._forking, self._fork = self._forking, "no", None
        if stash is None or self.failed:
            return result
        try:
            rows = cond_rows(stash.text_cond)
            if cond_seg is not None and cond_seg.shape != x_out[:rows].shape:
                cond_seg = None  # the host's calls were not whole images (tiles): the forked rows are not cond_seg
                self._plain_path("the host's model calls work on tiles")
            elif cond_seg is None and forking == "ran":
                return result  # the fork ran, but no selected layer could be smoothed on this step
            elif cond_seg is None and forking == "armed":
                self._plain_path("the host split this step's rows over several calls")
            if cond_seg is None:
                cond_seg = self._extra_pass(denoiser, stash, rows)
            if cond_seg is None:
                return result
            weights = None
            if conds_list is not None and not all(pairs == [(i, 1.0)] for i, pairs in enumerate(conds_list)):
                weights = cond_weights(conds_list, rows, dtype=result.dtype, device=result.device)
            uncond = x_out[-result.shape[0] :]  # the host's uncond rows (snf rescale reads them)
            guided = seg_guidance(
                result, x_out[:rows], cond_seg, self.params.scale, weights, **rescale_args(self.params, uncond)
            )
            self.note_guided()
            return guided
        except Exception as error:  # SEG must never break the user's generation
            self.give_up(f"SEG failed and is off for the rest of this generation: {error!r}")
            return result

    def _extra_pass(self, denoiser: Any, stash: Any, rows: int) -> torch.Tensor | None:
        targets = self._targets_for(self.host.unet())
        if targets is None:
            return None
        text_cond = match_host_padding(self.host, denoiser, stash.text_cond, stash.text_uncond)
        blurred = [0]
        with self.host.extra_call(self._call_state), self._smoothing(targets, blurred):
            cond_seg = denoiser.inner_model(
                stash.x[:rows],
                stash.sigma[:rows],
                cond=make_condition(text_cond, stash.image_cond[:rows], self.host.conditioning_key()),
            )
        if blurred[0] == 0:
            return None  # no selected layer could be smoothed on this step (said per layer): no SEG term
        return cond_seg

    def _targets_for(self, unet: nn.Module | None) -> Targets | None:
        key = (id(unet), self.params.layers)  # the hires pass may select other layers
        if key not in self._targets:
            self._targets[key] = self._resolve(unet)
        return self._targets[key]

    def _resolve(self, unet: nn.Module | None) -> Targets | None:
        refs = self.selected_layers(unet)
        if refs is None:
            return None
        return [Target(ref, attn1_module(unet, ref), spatial_transformer(unet, ref)) for ref in refs]

    def _smoothing(
        self, targets: Targets, blurred: list[int], rows: slice | None = None
    ) -> contextlib.AbstractContextManager[None]:
        return query_smoothing(self, targets, blurred, rows, self.host.token_regrouping())
