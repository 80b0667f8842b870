"""The host adapter the script delegates to, chosen once from the detected host."""

from __future__ import annotations

from typing import Any, Protocol

from seg_lib.core.params import SegParams, to_infotext
from seg_lib.log import log


class Adapter(Protocol):
    def install_callbacks(self, callbacks: Any) -> None: ...
    def start(self, p: Any, params: SegParams) -> None: ...
    def finish(self, p: Any) -> None: ...


class A1111Adapter:
    """AUTOMATIC1111: a SegRun on ``p`` and one ``on_cfg_denoiser`` callback (see ``host/a1111.py``)."""

    def install_callbacks(self, callbacks: Any) -> None:
        from seg_lib.host.a1111 import on_cfg_denoiser

        callbacks.on_cfg_denoiser(on_cfg_denoiser, name="sd-webui-seg")

    def start(self, p: Any, params: SegParams) -> None:
        from seg_lib.host.a1111 import RUN_ATTRIBUTE, SegRun

        setattr(p, RUN_ATTRIBUTE, SegRun(p, params) if params.enabled else None)

    def finish(self, p: Any) -> None:
        from seg_lib.host.a1111 import RUN_ATTRIBUTE

        setattr(p, RUN_ATTRIBUTE, None)


class UnsupportedAdapter:
    """A host SEG cannot drive yet: say so once per generation and leave the generation alone."""

    def __init__(self, host: str) -> None:
        self.host = host

    def install_callbacks(self, callbacks: Any) -> None:
        return None

    def start(self, p: Any, params: SegParams) -> None:
        if params.enabled:
            log(f"SEG does not support this WebUI ({self.host}) yet; generating without SEG")
            for key in to_infotext(params):
                p.extra_generation_params.pop(key, None)

    def finish(self, p: Any) -> None:
        return None


def adapter_for(host: str) -> Adapter:
    if host == "a1111":
        return A1111Adapter()
    return UnsupportedAdapter(host)
