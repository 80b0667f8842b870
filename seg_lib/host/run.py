"""What every host's per-generation SEG state shares: where it lives, and how it reports and gives up."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from seg_lib.core.params import SegParams, to_infotext
from seg_lib.log import log

RUN_ATTRIBUTE = "seg_run"  # a generation's run lives on its processing object, never on the Script


@dataclass
class Run:
    """One generation's SEG state."""

    p: Any
    params: SegParams
    failed: bool = False
    _said: set[str] = field(default_factory=set)

    def on_denoiser(self, params: Any) -> None:
        """Called from ``on_cfg_denoiser`` at every step of this generation."""

    def say_once(self, key: str, message: str) -> None:
        """One console line per generation for each kind of event."""
        if key not in self._said:
            self._said.add(key)
            log(message)

    def give_up(self, message: str) -> None:
        """Stop SEG for the rest of this generation; its images must not claim SEG in their infotext."""
        self.failed = True
        self.say_once("give-up", message)
        for key in to_infotext(self.params):
            self.p.extra_generation_params.pop(key, None)


def on_cfg_denoiser(params: Any) -> None:
    """The one ``on_cfg_denoiser`` callback (both hosts): hands the step to the generation's run, if any."""
    run = getattr(getattr(params.denoiser, "p", None), RUN_ATTRIBUTE, None)
    if isinstance(run, Run):
        run.on_denoiser(params)
