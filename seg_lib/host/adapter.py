"""The host adapter the script delegates to, chosen once from the detected host."""

from __future__ import annotations

from typing import Any, Protocol

from seg_lib.core.params import BY_INFOTEXT, SegParams
from seg_lib.host.memory import give_back_free_heap
from seg_lib.host.run import RUN_ATTRIBUTE, Run, is_hires_pass, on_cfg_denoiser
from seg_lib.log import log


class Adapter(Protocol):
    def install_callbacks(self, callbacks: Any) -> None: ...
    def start(self, p: Any, params: SegParams) -> None: ...
    def before_sampling(self, p: Any) -> None: ...
    def begin_batch(self, p: Any) -> None: ...
    def end_batch(self, p: Any) -> None: ...
    def finish(self, p: Any) -> None: ...


def _run_of(p: Any) -> Run | None:
    run = getattr(p, RUN_ATTRIBUTE, None)
    return run if isinstance(run, Run) else None


class _Batches:
    """Both hosts: a batch's images claim SEG only once one of its steps was guided (``Run.note_guided``)."""

    def begin_batch(self, p: Any) -> None:
        run = _run_of(p)
        if run is not None:
            run.begin_batch()

    def end_batch(self, p: Any) -> None:
        run = _run_of(p)
        if run is not None:
            run.end_batch()


def end_run(p: Any) -> None:
    """The generation is over: its run goes, and the C heap its rows grew is given back (see memory.py)."""
    run = getattr(p, RUN_ATTRIBUTE, None)
    setattr(p, RUN_ATTRIBUTE, None)
    if isinstance(run, Run) and run.ran_on_cpu:
        give_back_free_heap()


class A1111Adapter(_Batches):
    """AUTOMATIC1111: a SegRun on ``p``, driven by ``on_cfg_denoiser`` (see ``host/a1111.py``)."""

    def install_callbacks(self, callbacks: Any) -> None:
        callbacks.on_cfg_denoiser(on_cfg_denoiser)  # no name=: 1.8-era hosts do not take it

    def start(self, p: Any, params: SegParams) -> None:
        from seg_lib.host.a1111 import SegRun

        setattr(p, RUN_ATTRIBUTE, SegRun(p, params) if params.enabled else None)

    def before_sampling(self, p: Any) -> None:
        return None  # the denoiser callback finds the run at every step; nothing to set up per pass

    def finish(self, p: Any) -> None:
        end_run(p)


class ForgeAdapter(_Batches):
    """Forge: a ForgeRun on ``p`` that patches each sampling pass's UNet (see ``host/forge.py``)."""

    def __init__(self, host: str) -> None:
        self.host = host

    def install_callbacks(self, callbacks: Any) -> None:
        callbacks.on_cfg_denoiser(on_cfg_denoiser)  # no name=: 1.8-era hosts do not take it

    def start(self, p: Any, params: SegParams) -> None:
        from seg_lib.host.forge import ForgeHost, ForgeRun

        run = ForgeRun(p, params, host=ForgeHost.load(self.host)) if params.enabled else None
        setattr(p, RUN_ATTRIBUTE, run)

    def before_sampling(self, p: Any) -> None:
        run = getattr(p, RUN_ATTRIBUTE, None)
        if run is not None and run.enter_pass(is_hires_pass(p)):
            run.patch(p)

    def finish(self, p: Any) -> None:
        end_run(p)


class UnsupportedAdapter:
    """No WebUI SEG can drive: say so once per generation and leave the generation alone."""

    def __init__(self, host: str) -> None:
        self.host = host

    def install_callbacks(self, callbacks: Any) -> None:
        return None

    def start(self, p: Any, params: SegParams) -> None:
        if params.enabled:
            log(f"SEG does not support this WebUI ({self.host}); generating without SEG")
            for key in BY_INFOTEXT:
                p.extra_generation_params.pop(key, None)

    def before_sampling(self, p: Any) -> None:
        return None

    def begin_batch(self, p: Any) -> None:
        return None

    def end_batch(self, p: Any) -> None:
        return None

    def finish(self, p: Any) -> None:
        return None


def adapter_for(host: str) -> Adapter:
    if host == "a1111":
        return A1111Adapter()
    if host in ("forge", "forge-legacy"):
        return ForgeAdapter(host)
    return UnsupportedAdapter(host)
