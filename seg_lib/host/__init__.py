"""Which WebUI we run in, decided once, by guarded imports (nothing here imports a host module by name).

- ``forge``: new Forge (``backend/``, its own UNet patcher).
- ``forge-legacy``: the ``ldm_patched`` family (2024 Forge, reForge, Forge Classic).
- ``a1111``: AUTOMATIC1111 (``ldm``/``sgm`` UNets, CFG denoiser callbacks).
- ``none``: no WebUI (tests, the benchmark).
"""

from __future__ import annotations

import importlib.util


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package that is missing or half-initialised
        return False


def detect_host() -> str:
    if _importable("backend.patcher.unet") and _importable("backend.sampling.sampling_function"):
        return "forge"
    if _importable("ldm_patched.modules.model_patcher"):
        return "forge-legacy"
    if _importable("modules.sd_samplers_cfg_denoiser"):
        return "a1111"
    return "none"


HOST = detect_host()
