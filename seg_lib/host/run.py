"""What every host's per-generation SEG state shares: where it lives, and how it reports and gives up."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from seg_lib.core.blocks import DitRef, LayerRef, resolve_layers
from seg_lib.core.blur import smooth_queries
from seg_lib.core.params import BY_INFOTEXT, HIRES, HIRES_OVERRIDES, SegParams, for_pass, to_infotext
from seg_lib.families import DIT_FAMILIES
from seg_lib.families.unet import is_stock_unet, read_layout
from seg_lib.log import log

RUN_ATTRIBUTE = "seg_run"  # a generation's run lives on its processing object, never on the Script
_HIRES_KEYS = {param.infotext for param in (HIRES, *HIRES_OVERRIDES)}


@dataclass
class Run:
    """One generation's SEG state. ``params`` are the settings of the sampling pass now running (the hires
    fix pass may have its own, see ``enter_pass``); ``generation`` the settings the generation was given."""

    p: Any
    params: SegParams
    failed: bool = False
    ran_on_cpu: bool = False  # SEG's rows lived on the C heap: the generation ends by giving it back (memory.py)
    _said: set[str] = field(default_factory=set)
    generation: SegParams | None = None
    _guided: set[str] = field(default_factory=set)  # the passes of this batch in which a step got its SEG term
    why_unguided: str = "no step reached SEG's guidance"  # the last reason a step got no SEG term

    def __post_init__(self) -> None:
        if self.generation is None:
            self.generation = self.params

    def enter_pass(self, hires_pass: bool) -> bool:
        """Take the settings of the pass now sampling (first pass or hires fix); False: SEG is off in it."""
        params = for_pass(self.generation, hires_pass)
        if params is None:
            return False
        self.params = params
        return True

    def begin_batch(self) -> None:
        """A batch begins (``process_batch``): its images claim SEG only once one of its steps was guided."""
        self._guided.clear()
        self._said.discard("unguided")  # each batch that claims nothing says why
        self.why_unguided = Run.why_unguided
        for key in BY_INFOTEXT:
            self.p.extra_generation_params.pop(key, None)

    def note_guided(self) -> None:
        """A step got its SEG term: from now on this batch's images claim SEG in their infotext. Until the
        hires pass has had one too, a generation with hires fix says SEG was off there."""
        hires_pass = is_hires_pass(self.p)
        pass_name = "hires" if hires_pass else "first"
        if self.failed or pass_name in self._guided:
            return
        self._guided.add(pass_name)
        hires_fix = bool(getattr(self.p, "enable_hr", False))
        claims = to_infotext(self.generation, hires_fix=hires_fix)
        if hires_fix and "hires" not in self._guided:
            claims = {key: value for key, value in claims.items() if key not in _HIRES_KEYS}
            claims[HIRES.infotext] = "off"
        for key in BY_INFOTEXT:
            self.p.extra_generation_params.pop(key, None)
        self.p.extra_generation_params.update(claims)

    def end_batch(self) -> None:
        """A batch's images are made (``postprocess_batch``): say why they carry no SEG keys, if they do not."""
        if not self.failed and not self._guided:
            self.say_once("unguided", f"no step was guided ({self.why_unguided}); the images do not claim SEG")

    def declined(self, why: str) -> None:
        """A step (or a layer of it) got no SEG term: keep the reason for the batch's closing line."""
        self.why_unguided = why

    def on_denoiser(self, params: Any) -> None:
        """Called from ``on_cfg_denoiser`` at every step of this generation."""

    def selected_layers(self, unet: Any) -> tuple[LayerRef, ...] | None:
        """The attn1 layers the settings pick in this UNet, or None (SEG given up, one line) when the model
        has no SD/SDXL UNet or lacks a selected block."""
        if unet is None or not is_stock_unet(unet):
            name = type(unet).__name__ if unet is not None else "no diffusion model"
            dits = ", ".join(family.name for family in DIT_FAMILIES)
            self.give_up(
                f"SEG does not apply to this model yet ({name}: SEG knows the SD/SDXL UNet and the DiTs {dits}); "
                "generating without SEG"
            )
            return None
        try:
            return resolve_layers(self.params.layers, read_layout(unet))
        except ValueError as error:
            self.give_up(f"SEG is off for this generation: {error}")
            return None

    def smoothed(
        self, ref: LayerRef | DitRef, q: torch.Tensor, grid: tuple[int, int] | None, why: str = ""
    ) -> torch.Tensor | None:
        """The layer's queries blurred on ``grid``, the (height, width) of the hidden state that entered its
        transformer in this very call (not a size derived from the latent: Deep Shrink, tiles and hires
        passes change it), or None when the queries do not lie on that grid. Then the layer is skipped for
        this call only, with one console line per layer and generation; ``why`` names the likely cause."""
        tokens = q.shape[1]
        part = getattr(ref, "part", None) or ref.kind  # a UNet LayerRef or a DiT block
        if grid is None or grid[0] * grid[1] != tokens:
            where = f"{part} block {ref.index}"
            if grid is None:
                reason = f"skipping {where}: the shape of its input was not seen (a UNet SEG does not know?)"
            else:
                reason = (
                    f"skipping {where} on the steps where its {tokens} tokens per row are not the "
                    f"{grid[0]}x{grid[1]} grid it works on{f' ({why})' if why else ''}; SEG goes on where it can"
                )
            self.say_once(f"skip:{part}{ref.index}", reason)
            self.declined(f"the selected layers were skipped: {reason}")
            return None
        self.ran_on_cpu = self.ran_on_cpu or q.device.type == "cpu"
        return smooth_queries(q, grid[0], grid[1], self.params.blur_sigma)

    def say_once(self, key: str, message: str) -> None:
        """One console line per generation for each kind of event."""
        if key not in self._said:
            self._said.add(key)
            log(message)

    def give_up(self, message: str) -> None:
        """Stop SEG for the rest of this generation; its images must not claim SEG in their infotext."""
        self.failed = True
        self.say_once("give-up", message)
        for key in BY_INFOTEXT:
            self.p.extra_generation_params.pop(key, None)


def is_hires_pass(p: Any) -> bool:
    """Whether ``p`` is sampling its hires fix pass (A1111 1.10 and Forge set ``is_hr_pass`` for its duration)."""
    return bool(getattr(p, "is_hr_pass", False))


def on_cfg_denoiser(params: Any) -> None:
    """The one ``on_cfg_denoiser`` callback (both hosts): hands the step to the generation's run, if any,
    with the settings of the pass it belongs to (nothing at all in a pass where SEG is off)."""
    p = getattr(params.denoiser, "p", None)
    run = getattr(p, RUN_ATTRIBUTE, None)
    if isinstance(run, Run) and run.enter_pass(is_hires_pass(p)):
        run.on_denoiser(params)
