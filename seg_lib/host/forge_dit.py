"""SEG on the DiT models a Forge-family host runs (Flux, Chroma, SD3.5): what the Forge run needs apart from
its UNet path. The guidance, the step window, the same-call wrapper and the separate call are the UNet's
(``forge.py``, ``forge_same_call.py``); the smoothing is ``seg_lib/families/hooks.py``: the image queries of
the selected blocks, where the host's attention kernel gets them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from seg_lib.core.blocks import DEFAULT_LAYERS, DitRef, resolve_dit
from seg_lib.core.blur import is_infinite
from seg_lib.families import DitFamily
from seg_lib.families.dit import Site, kernel_sites, module_buffers
from seg_lib.families.hooks import DitCall, dit_hooks

if TYPE_CHECKING:
    from seg_lib.host.forge import ForgeRun


@dataclass(frozen=True)
class DitSeg:
    """One sampling pass's DiT: its family, the blocks SEG smooths, and where their queries are."""

    family: DitFamily
    model: Any
    refs: tuple[DitRef, ...]
    sites: tuple[Site, ...]
    buffers: tuple[str, ...] = ()  # module-level per-call buffers of the blocks: no fork (module_buffers)

    @property
    def fork_note(self) -> str:
        if self.buffers:
            return f"not forked: its blocks keep per-call buffers in module globals ({', '.join(self.buffers)})"
        return f"forked from the conditional branch at {self.refs[0].kind} block {self.refs[0].index}"

    @contextlib.contextmanager
    def hooks(self, run: ForgeRun, counts: dict[str, int], rows: int = 0, fork: slice | None = None) -> Iterator[None]:
        """SEG in the host's model calls made inside: the batch rows from ``rows`` on smoothed (the copies of
        the ``fork`` rows, made at the first selected block, on the same-call path)."""
        call = DitCall(
            self.family,
            self.model,
            self.refs,
            self.sites,
            run.smoothed,
            is_infinite(run.params.blur_sigma),
            rows,
            fork,
            counts,
        )
        with dit_hooks(call):
            yield


def family_layers(layers: str, family: DitFamily) -> str:
    """The UNet default (``m0``) on a DiT means the family's default; any other selection is the user's."""
    return family.default_layers if layers == DEFAULT_LAYERS else layers


def prepare(run: ForgeRun, model: Any, family: DitFamily) -> DitSeg | None:
    """The pass's DiT blocks, or None (SEG given up with one line: a bad selection, or a host whose blocks
    call attention in a way SEG does not know)."""
    generation = run.generation
    if generation is not None:
        run.generation = replace(
            generation,
            layers=family_layers(generation.layers, family),
            hires_layers=family_layers(generation.hires_layers, family),
        )
    run.params = replace(run.params, layers=family_layers(run.params.layers, family))
    try:
        refs = resolve_dit(run.params.layers, family.layout(model), family.name)
    except ValueError as error:
        run.give_up(f"SEG is off for this generation: {error}")
        return None
    sites = kernel_sites(family, model)
    if isinstance(sites, str):
        run.give_up(f"SEG does not apply to {family.name} on this WebUI version ({sites}); generating without SEG")
        return None
    if not family.real_cfg and getattr(run.p, "cfg_scale", 1) == 1:
        run.say_once("cfg1", f"SEG on {family.name} at CFG 1: cond + scale * (cond - cond_seg)")
    return DitSeg(family, model, refs, sites, module_buffers(family, model))
