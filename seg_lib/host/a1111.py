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
3. Otherwise (another forward: ControlNet, TensorRT, another extension's wrapper; or the host split the
   rows over several calls) one cond-only UNet call runs after the host's, with the queries smoothed.
4. In the wrapped ``combine_denoised`` the host's CFG result is computed first, then
   ``cfg_result + scale * (cond - cond_seg)`` is returned, AND-prompt weights applied. Inpaint blending,
   previews and ``on_cfg_after_cfg`` then see the guided result, exactly as they see plain CFG.

Query hooks and the forked forward exist only during one call (try/finally), so an error, an interrupt or
a skipped job leaves nothing behind.
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
from seg_lib.core.blur import is_infinite
from seg_lib.core.guidance import cond_weights, in_step_window, seg_guidance
from seg_lib.host.fork import NotRows, StockForward, first_block, forked_forward, stock_forward, with_row_copies
from seg_lib.host.one_query import one_query_attn1
from seg_lib.host.run import Run
from seg_lib.host.unet_layout import attn1_module
from seg_lib.settings import fast_path_enabled

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


@dataclass(frozen=True)
class _Fork:
    """This step's plan for the fast path: fork ``rows`` cond rows at block ``at`` of ``unet``."""

    unet: nn.Module
    stock: StockForward
    at: tuple[str, int]
    rows: int
    batches: tuple[int, ...]  # the host call sizes that hold every cond row first: all rows, or cond only
    targets: _Targets
    height: int
    width: int


@dataclass
class SegRun(Run):
    """One generation's SEG state on A1111."""

    host: Host = field(default_factory=Host)
    _stash: Any = None  # this step's CFGDenoiserParams: the host reads its inputs back from it too
    _targets: dict[int, _Targets | None] = field(default_factory=dict)
    _fork: _Fork | None = None  # armed for the host's next model call of this step
    _cond_seg: torch.Tensor | None = None  # the smoothed branch the fast path computed this step
    _planned: bool = False  # a fork was armed this step (so a missing cond_seg means the rows were split)

    # -- host callbacks -------------------------------------------------------------------------------
    def on_denoiser(self, params: Any) -> None:
        """``on_cfg_denoiser``: remember this step's inputs when SEG runs at this step."""
        self._stash, self._fork, self._cond_seg, self._planned = None, None, None, False
        if self.failed or not in_step_window(
            params.sampling_step, params.total_sampling_steps, self.params.start, self.params.end
        ):
            return
        self._wrap_combine(params.denoiser)
        self._stash = params
        try:
            self._fork = self._plan_fork(params)
            self._planned = self._fork is not None
        except Exception as error:  # the fast path is an optimisation: never let it stop SEG
            self.say_once("path:plan-error", f"SEG: fast path unavailable ({error!r}); separate extra UNet pass")

    def _plain_path(self, reason: str) -> None:
        self.say_once(f"path:plain:{reason}", f"SEG: separate extra UNet pass per step ({reason})")

    def _plan_fork(self, params: Any) -> _Fork | None:
        if not fast_path_enabled(self.host.opts()):
            self._plain_path("the fast SEG setting is off")
            return None
        unet = self.host.unet()
        targets = self._targets_for(unet)
        if targets is None:
            return None
        stock = "a custom UNet (TensorRT?) is active" if self.host.custom_unet_active() else None
        stock = stock or stock_forward(unet, self.host.stock_forwards())
        if isinstance(stock, str):
            self._plain_path(stock)
            return None
        inner = params.denoiser.inner_model
        if not isinstance(inner, nn.Module):
            self._plain_path("the sampler's model wrapper is not a torch module")
            return None
        self._wrap_inner(inner)
        rows = cond_rows(params.text_cond)
        height, width = params.x.shape[-2:]
        at = first_block(ref for ref, _ in targets)
        return _Fork(unet, stock, at, rows, (params.x.shape[0], rows), targets, height, width)

    def _wrap_inner(self, inner: nn.Module) -> None:
        """Route the host's model call through ``_forked_call`` when this step's fork is armed."""
        if getattr(inner, "seg_wrapped_by", None) is self:
            return
        plain = inner.forward

        @functools.wraps(plain)
        def forward(*args: Any, **kwargs: Any) -> Any:
            fork, self._fork = self._fork, None  # only the step's first call can hold every cond row first
            if fork is None or self.failed or not args or args[0].shape[0] not in fork.batches:
                return plain(*args, **kwargs)
            return self._forked_call(fork, plain, args, kwargs)

        inner.forward = forward
        inner.seg_wrapped_by = self

    def _forked_call(self, fork: _Fork, plain: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        """The host's call with the cond rows' copies appended, the UNet forked for its duration."""
        batch = args[0].shape[0]
        try:
            more_args = with_row_copies(args, batch, fork.rows, cut=True)
            more_kwargs = with_row_copies(kwargs, batch, fork.rows, cut=True)
        except NotRows as error:
            self._planned = False
            self._plain_path(f"the model call has {error}")
            return plain(*args, **kwargs)

        def forward(x: torch.Tensor, timesteps: Any = None, context: Any = None, y: Any = None, **_: Any) -> Any:
            return forked_forward(fork.unet, fork.stock, fork.at, fork.rows, x, timesteps, context, y)

        blurred = [0]
        fork.unet.forward = forward
        try:
            with self._smoothing(fork.targets, fork.height, fork.width, blurred, rows=fork.rows):
                out = plain(*more_args, **more_kwargs)
        except Exception as error:  # SEG must never break the user's generation: redo the host's call as is
            out = error
        finally:
            vars(fork.unet).pop("forward", None)
        if isinstance(out, Exception):
            self.give_up(f"SEG failed and is off for the rest of this generation: {out!r}")
            return plain(*args, **kwargs)
        if blurred[0] == 0:
            self.give_up("SEG: none of the selected layers could be smoothed (custom UNet or merged tokens)")
        else:
            part, index = fork.at
            self.say_once("path:fork", f"SEG: fast path, forked from the conditional branch at {part} block {index}")
            self._cond_seg = out[batch:]
        return out[:batch]

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
        planned, self._planned, self._fork = self._planned, False, None
        if stash is None or self.failed:
            return result
        try:
            rows = cond_rows(stash.text_cond)
            if cond_seg is None:
                if planned:
                    self._plain_path("the host split this step's rows over several calls")
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
    def _smoothing(
        self, targets: _Targets, height: int, width: int, blurred: list[int], rows: int | None = None
    ) -> Iterator[None]:
        """Forward hooks on each selected ``attn1.to_q`` for the duration of one UNet call; they smooth the
        last ``rows`` rows of the queries (all rows when None)."""

        one_query = is_infinite(self.params.blur_sigma)  # attention for one mean query per row (one_query.py)
        state = {"one": False}

        def hook_for(ref: LayerRef) -> Callable[..., torch.Tensor]:
            def smooth(_module: nn.Module, _args: object, q: torch.Tensor) -> torch.Tensor:
                if one_query:  # the attn1 forward passes the rows to smooth alone, with state["one"] set
                    smoothed = self.smoothed(ref, q, height, width) if state["one"] else None
                    blurred[0] += smoothed is not None
                    return q if smoothed is None else smoothed[:, :1]
                part = q if rows is None else q[-rows:]
                smoothed = self.smoothed(ref, part, height, width)
                if smoothed is None:
                    return q
                blurred[0] += 1
                if rows is None:
                    return smoothed
                part.copy_(smoothed)  # the branch's rows only, in place: the host's rows are untouched
                return q

            return smooth

        handles = [module.to_q.register_forward_hook(hook_for(ref)) for ref, module in targets]
        try:
            with one_query_attn1([module for _, module in targets] if one_query else [], rows, state):
                yield
        finally:
            for handle in handles:
                handle.remove()
