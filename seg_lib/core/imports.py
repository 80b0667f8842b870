"""SEG settings from the infotext of the two other SEG extensions people come from, as our infotext keys.

- pamparamm/sd-perturbed-attention (Forge/reForge/ComfyUI) writes ``seg_enabled``, ``seg_scale``,
  ``seg_blur_sigma`` (negative = infinite), ``seg_block`` + ``seg_block_id`` or ``seg_block_list``,
  ``seg_rescale`` + ``seg_rescale_mode``, with hires fix ``seg_hr_override`` and, when on, ``seg_hr_cfg``,
  ``seg_hr_scale``, ``seg_hr_rescale``, ``seg_hr_rescale_mode``, ``seg_hr_blur_sigma`` (its hires pass keeps
  the first pass's blocks), and ``seg_sigma_start`` / ``seg_sigma_end``: a window of noise levels
  (``end < sigma <= start``, negative = unbounded).
- v0xie/sd-webui-incantations (A1111) writes ``SEG Active``, ``SEG Blur Sigma`` (an exponent: sigma =
  2^value, above 10.5 infinite) and ``SEG Start Step`` / ``SEG End Step`` (0-based sampler steps, both
  inclusive). It blurred the middle block's queries of the *negative* branch of the host's own batch and had
  no SEG scale, so the same settings here guide differently.

Each function returns our keys (for ``params_from_infotext``), host keys to fill in, and console notes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from seg_lib.core.params import BLUR_SIGMA, SCALE, SegParams

PAMPARAMM_MARK = "seg_enabled"
INCANTATIONS_MARK = "SEG Active"
DEFAULT_STEPS = 20  # the WebUIs' default, for infotext without "Steps"
HOST_HIRES_CFG = "Hires CFG Scale"  # Forge's own hires CFG field (A1111 1.10 has none)
INCANTATIONS_INFINITE_ABOVE = 10.5
DIFFERENT_METHOD = (
    "incantations' SEG guided differently (it blurred the negative branch and had no SEG scale): settings "
    "imported (SEG scale {scale:g}), but the image will not be the same"
)

Imported = tuple[dict[str, Any], dict[str, Any], list[str]]


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _is_false(value: Any) -> bool:
    return str(value).strip().lower() == "false"


def _steps(fields: Mapping[str, Any], notes: list[str]) -> int:
    steps = _number(fields.get("Steps"))
    if steps is None or steps < 1:
        notes.append(f"no Steps in the infotext: the step window assumes {DEFAULT_STEPS} steps")
        return DEFAULT_STEPS
    return int(steps)


def step_fraction(step: float, steps: int) -> float:
    """Where a 0-based step lies in our step window (0 = first step, 1 = last), clamped to 0..1."""
    if steps <= 1:
        return 0.0
    return min(max(step / (steps - 1), 0.0), 1.0)


# -- the noise schedule, for pamparamm's sigma window -----------------------------------------------------
@lru_cache(maxsize=1)
def _training_sigmas() -> tuple[float, ...]:
    """The 1000 discrete sigmas of SD1.x/SD2.x/SDXL (scaled-linear betas 0.00085..0.012), t = 0..999."""
    low, high = math.sqrt(0.00085), math.sqrt(0.012)
    alphas_cumprod, product = [], 1.0
    for i in range(1000):
        product *= 1.0 - (low + (high - low) * i / 999) ** 2
        alphas_cumprod.append(product)
    return tuple(math.sqrt((1 - a) / a) for a in alphas_cumprod)


def schedule(steps: int, karras: bool) -> list[float]:
    """The sigma of each of ``steps`` sampler steps: Karras (rho 7), or the model's own uniform-timestep
    schedule (what "Automatic" gives Euler and most samplers)."""
    sigmas = _training_sigmas()
    if steps <= 1:
        return [sigmas[-1]]
    if karras:
        lo, hi = sigmas[0] ** (1 / 7), sigmas[-1] ** (1 / 7)
        return [(hi + i / (steps - 1) * (lo - hi)) ** 7 for i in range(steps)]
    logs = [math.log(s) for s in sigmas]
    out = []
    for i in range(steps):
        t = 999 * (1 - i / (steps - 1))
        below = math.floor(t)
        above = min(below + 1, 999)
        w = t - below
        out.append(math.exp(logs[below] * (1 - w) + logs[above] * w))
    return out


def sigma_window(sigma_start: float, sigma_end: float, sigmas: list[float]) -> tuple[float, float] | None:
    """Our (start, end) step fractions for the steps whose sigma lies in ``end < sigma <= start`` (negative
    start: no upper bound; negative end: no lower bound), or None when no step does."""
    top = math.inf if sigma_start < 0 else sigma_start
    inside = [i for i, sigma in enumerate(sigmas) if sigma_end < sigma <= top]
    if not inside:
        return None
    return step_fraction(inside[0], len(sigmas)), step_fraction(inside[-1], len(sigmas))


# -- pamparamm/sd-perturbed-attention ------------------------------------------------------------------------
def _pamparamm_sigma(value: Any) -> Any:
    number = _number(value)
    return "inf" if number is not None and number < 0 else value


def _pamparamm_rescale(fields: Mapping[str, Any], prefix: str) -> tuple[float | None, str]:
    """(rescale, mode) as ours: its snf applies whatever its rescale value, which is our rescale 1."""
    mode = str(fields.get(f"{prefix}rescale_mode", "full")).strip().lower()
    if mode == "snf":
        return 1.0, mode
    return _number(fields.get(f"{prefix}rescale", 0)), mode


def _effective(rescale: float | None, mode: str) -> tuple[float, str]:
    return (rescale or 0.0, mode if rescale else "")


def from_pamparamm(fields: Mapping[str, Any]) -> Imported:
    ours: dict[str, Any] = {}
    host: dict[str, Any] = {}
    notes: list[str] = []
    if _is_false(fields[PAMPARAMM_MARK]):
        return {}, host, notes
    ours[SCALE.infotext] = fields.get("seg_scale", SCALE.format(SCALE.default))
    if "seg_blur_sigma" in fields:
        ours["SEG Sigma"] = _pamparamm_sigma(fields["seg_blur_sigma"])
    block_list = str(fields.get("seg_block_list", "") or "").strip()
    if block_list:
        ours["SEG Layers"] = block_list
    elif "seg_block" in fields:
        ours["SEG Layers"] = f"{fields['seg_block']}{fields.get('seg_block_id', 0)}"
    rescale, mode = _pamparamm_rescale(fields, "seg_")
    if rescale:
        ours["SEG Rescale"], ours["SEG Rescale Mode"] = rescale, mode
    if str(fields.get("seg_hr_override", "")).strip().lower() == "true":
        ours["SEG Hires"] = "override"
        ours["SEG Hires Scale"] = fields.get("seg_hr_scale", ours[SCALE.infotext])
        ours["SEG Hires Sigma"] = _pamparamm_sigma(fields.get("seg_hr_blur_sigma", ours.get("SEG Sigma", "inf")))
        ours["SEG Hires Layers"] = ours.get("SEG Layers", "m0")  # its hires pass keeps the first pass's blocks
        if _effective(*_pamparamm_rescale(fields, "seg_hr_")) != _effective(rescale, mode):
            notes.append("seg_hr_rescale/seg_hr_rescale_mode: the hires pass here keeps the first pass's rescale")
        if "seg_hr_cfg" in fields and HOST_HIRES_CFG not in fields:
            host[HOST_HIRES_CFG] = fields["seg_hr_cfg"]
            notes.append(
                f"seg_hr_cfg {fields['seg_hr_cfg']} -> the WebUI's own {HOST_HIRES_CFG} (Forge; A1111 has none)"
            )
    if "seg_sigma_start" in fields or "seg_sigma_end" in fields:
        _pamparamm_window(fields, ours, notes)
    return ours, host, notes


def _pamparamm_window(fields: Mapping[str, Any], ours: dict[str, Any], notes: list[str]) -> None:
    start, end = _number(fields.get("seg_sigma_start", -1)), _number(fields.get("seg_sigma_end", -1))
    if start is None or end is None:
        notes.append("seg_sigma_start/seg_sigma_end are not numbers: the whole sampling pass is kept")
        return
    steps = _steps(fields, notes)
    kind = f"{fields.get('Schedule type', '')} {fields.get('Sampler', '')}".lower()
    window = sigma_window(start, end, schedule(steps, karras="karras" in kind))
    if window is None:
        ours.clear()  # no step was inside its window: it never guided
        notes.append(f"seg_sigma_start/seg_sigma_end {start:g}/{end:g} cover no step of {steps}: SEG off")
        return
    ours["SEG Start"], ours["SEG End"] = window
    notes.append(
        f"seg_sigma_start/seg_sigma_end {start:g}/{end:g} (noise levels) -> SEG Start/End "
        f"{window[0]:.3g}/{window[1]:.3g} of {steps} steps: an approximation (SD noise schedule assumed)"
    )


# -- v0xie/sd-webui-incantations -----------------------------------------------------------------------------
def from_incantations(fields: Mapping[str, Any]) -> Imported:
    notes: list[str] = []
    if _is_false(fields[INCANTATIONS_MARK]):
        return {}, {}, notes
    ours: dict[str, Any] = {SCALE.infotext: SCALE.format(SCALE.default), "SEG Layers": "m0"}
    exponent = _number(fields.get("SEG Blur Sigma"))
    if "SEG Blur Sigma" in fields:
        if exponent is None:
            ours["SEG Sigma"] = fields["SEG Blur Sigma"]  # malformed: reported by the parser
        elif exponent == 0:  # incantations skipped SEG at 0
            return {}, {}, ["SEG Blur Sigma 0: incantations ran no SEG"]
        elif exponent > INCANTATIONS_INFINITE_ABOVE:
            ours["SEG Sigma"] = "inf"
        else:
            ours["SEG Sigma"] = BLUR_SIGMA.format(min(max(2.0**exponent, BLUR_SIGMA.minimum), BLUR_SIGMA.maximum))
    if "SEG Start Step" in fields or "SEG End Step" in fields:
        steps = _steps(fields, notes)
        first, last = _number(fields.get("SEG Start Step", 0)), _number(fields.get("SEG End Step", steps - 1))
        if first is None or last is None:
            notes.append("SEG Start Step/SEG End Step are not numbers: the whole sampling pass is kept")
        elif first > last or first > steps - 1:
            return {}, {}, [*notes, f"SEG Start Step {first:g} / End Step {last:g} cover no step of {steps}: SEG off"]
        else:
            ours["SEG Start"], ours["SEG End"] = step_fraction(first, steps), step_fraction(last, steps)
    notes.append(DIFFERENT_METHOD.format(scale=SegParams().scale))
    return ours, {}, notes
