"""The one parameter table of SEG. UI controls, infotext, XYZ axes and API arguments are derived from it.

Order matters: it is the positional order of the API's ``alwayson_scripts`` args and of the UI controls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from seg_lib.core.blocks import DEFAULT_LAYERS, normalize_layers
from seg_lib.core.blur import INFINITE_SIGMA_THRESHOLD

SIGMA_MIN = 0.01
INFINITE_WORDS = {"inf", "+inf", "infinity", "+infinity", "infinite", "∞"}
_TRUE_WORDS = {"true", "1", "yes", "on"}
_FALSE_WORDS = {"false", "0", "no", "off"}


@dataclass(frozen=True)
class Param:
    """One SEG setting: everything the UI, infotext, XYZ and API need to know about it."""

    name: str  # field of SegParams, key of the API's named form
    label: str  # UI label; XYZ axis "[SEG] <label>"; names the setting in error messages
    infotext: str | None  # infotext key (None: not written; "enabled" is implied by the other keys)
    default: Any
    minimum: float | None
    maximum: float | None
    help: str  # tooltip
    rule: str  # what a valid value is, for error messages
    parse: Callable[[Param, Any], Any]
    format: Callable[[Any], str]
    choices: tuple[str, ...] | None = None  # the allowed words of a choice setting (dropdowns, XYZ)

    @property
    def numeric(self) -> bool:
        """A bounded number (sliders, float XYZ axes); the rest are text: sigma, layers, choices, on/off."""
        return self.parse is _parse_bounded

    def error(self, value: object) -> ValueError:
        return ValueError(f"SEG {self.label.lower()} ({self.name}) must be {self.rule}; got {value!r}")

    def check(self, value: object) -> Any:
        """The typed, validated value, or ``ValueError`` naming this parameter."""
        return self.parse(self, value)


def _parse_bool(param: Param, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    raise param.error(value)


def _to_float(param: Param, value: object) -> float:
    if isinstance(value, bool):
        raise param.error(value)
    if isinstance(value, (int, float)):
        try:
            return float(value)
        except OverflowError:  # an int past float range (JSON numbers have any length)
            raise param.error(value) from None
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            raise param.error(value) from None
    raise param.error(value)


def _parse_bounded(param: Param, value: object) -> float:
    number = _to_float(param, value)
    if not math.isfinite(number) or not (param.minimum <= number <= param.maximum):
        raise param.error(value)
    return number


def _parse_sigma(param: Param, value: object) -> float:
    if isinstance(value, str) and value.strip().lower() in INFINITE_WORDS:
        return math.inf
    number = _to_float(param, value)
    if math.isnan(number) or number < SIGMA_MIN:
        raise param.error(value)
    # The official code treats every sigma above the threshold as infinite blur.
    return math.inf if number > INFINITE_SIGMA_THRESHOLD else number


def _parse_layers(param: Param, value: object) -> str:
    try:
        return normalize_layers(value)  # type: ignore[arg-type]
    except ValueError as exc:
        detail = str(exc).removeprefix("layers: ")
        raise ValueError(f"SEG {param.label.lower()} ({param.name}): {detail}; got {value!r}") from None


def _parse_choice(param: Param, value: object) -> str:
    word = value.strip().lower() if isinstance(value, str) else None
    if word not in (param.choices or ()):
        raise param.error(value)
    return word


def _format_number(value: float) -> str:
    return "inf" if math.isinf(value) else repr(float(value))


def _fraction(name: str, label: str, infotext: str, default: float, help: str) -> Param:
    """A setting from 0 to 1 (the step window, the rescale blend): one range, rule, parser and format."""
    return Param(
        name=name,
        label=label,
        infotext=infotext,
        default=default,
        minimum=0.0,
        maximum=1.0,
        help=help,
        rule="a number from 0 to 1",
        parse=_parse_bounded,
        format=_format_number,
    )


def _choice(name: str, label: str, infotext: str, choices: tuple[str, ...], help: str) -> Param:
    """A setting that is one of ``choices`` (the first is the default): one rule, parser and format."""
    return Param(
        name=name,
        label=label,
        infotext=infotext,
        default=choices[0],
        minimum=None,
        maximum=None,
        help=help,
        rule=f"one of {', '.join(choices)}",
        parse=_parse_choice,
        format=str,
        choices=choices,
    )


ENABLED = Param(
    name="enabled",
    label="Enabled",
    infotext=None,
    default=False,
    minimum=None,
    maximum=None,
    help="Run Smoothed Energy Guidance: one extra conditional UNet pass per step with blurred "
    "self-attention queries, and guide away from it.",
    rule="true or false",
    parse=_parse_bool,
    format=lambda value: str(bool(value)),
)
SCALE = Param(
    name="scale",
    label="Scale",
    infotext="SEG Scale",
    default=3.0,
    minimum=0.0,
    maximum=30.0,
    help="SEG guidance strength. The paper keeps it at 3 and steers with the blur sigma; "
    "past about 3 it saturates. 0 = no effect.",
    rule="a number from 0 to 30",
    parse=_parse_bounded,
    format=_format_number,
)
BLUR_SIGMA = Param(
    name="blur_sigma",
    label="Blur sigma",
    infotext="SEG Sigma",
    default=math.inf,
    minimum=SIGMA_MIN,
    maximum=INFINITE_SIGMA_THRESHOLD,
    help="How far the queries are blurred over the image grid. Larger = stronger effect and more change "
    "to the image; inf (the default) replaces every query by their mean. "
    "Explore exponentially: 1, 4, 16, inf.",
    rule=f"a number from {SIGMA_MIN} to {INFINITE_SIGMA_THRESHOLD:g}, or inf for infinite blur",
    parse=_parse_sigma,
    format=_format_number,
)
LAYERS = Param(
    name="layers",
    label="Layers",
    infotext="SEG Layers",
    default=DEFAULT_LAYERS,
    minimum=None,
    maximum=None,
    help="Self-attention blocks to smooth: m0 = middle block (default), d<i> encoder, u<i> decoder, "
    "u0.4 = one transformer, d0-d3 = a range; comma-separated. DiT models: double<i>/single<i> (Flux, Chroma), "
    "joint<i> (SD3.5), e.g. joint7-9; m0 there means the model's own default.",
    rule="a block list such as m0, d0-d3, u0.4 or (DiT) joint7-9, double0,single3",
    parse=_parse_layers,
    format=str,
)
START = _fraction(
    name="start",
    label="Start",
    infotext="SEG Start",
    default=0.0,
    help="First step with SEG, as a fraction of the sampling pass (0 = first step).",
)
END = _fraction(
    name="end",
    label="End",
    infotext="SEG End",
    default=1.0,
    help="Last step with SEG, as a fraction of the sampling pass (1 = last step), inclusive.",
)

RESCALE_MODES = ("full", "partial", "snf")
RESCALE = _fraction(
    name="rescale",
    label="Rescale",
    infotext="SEG Rescale",
    default=0.0,
    help="Tames over-saturation from a large SEG scale: 0 = off (plain SEG), 1 = the full rescale of the "
    "chosen mode, in between a blend.",
)
RESCALE_MODE = _choice(
    name="rescale_mode",
    label="Rescale mode",
    infotext="SEG Rescale Mode",
    choices=RESCALE_MODES,
    help="full: match the std of CFG + SEG to the cond prediction's; partial: the same for cond + SEG; "
    "snf: per latent pixel, keep whichever of the CFG and SEG terms is more salient.",
)
HIRES_MODES = ("same", "off", "override")
HIRES = _choice(
    name="hires",
    label="Hires fix",
    infotext="SEG Hires",
    choices=HIRES_MODES,
    help="SEG in the hires fix pass: same as the first pass, off, or override with the hires scale, "
    "sigma and layers below (the hires CFG scale is the WebUI's own).",
)
HIRES_SCALE = replace(
    SCALE, name="hires_scale", label="Hires scale", infotext="SEG Hires Scale", help="SEG scale in the hires pass."
)
HIRES_BLUR_SIGMA = replace(
    BLUR_SIGMA,
    name="hires_blur_sigma",
    label="Hires blur sigma",
    infotext="SEG Hires Sigma",
    help="Blur sigma in the hires pass (inf = mean query).",
)
HIRES_LAYERS = replace(
    LAYERS, name="hires_layers", label="Hires layers", infotext="SEG Hires Layers", help="Layers in the hires pass."
)

# New settings go at the END: old positional API calls must keep working.
PARAMS: tuple[Param, ...] = (
    ENABLED,
    SCALE,
    BLUR_SIGMA,
    LAYERS,
    START,
    END,
    RESCALE,
    RESCALE_MODE,
    HIRES,
    HIRES_SCALE,
    HIRES_BLUR_SIGMA,
    HIRES_LAYERS,
)
RESCALE_PARAMS = (RESCALE, RESCALE_MODE)
HIRES_OVERRIDES = (HIRES_SCALE, HIRES_BLUR_SIGMA, HIRES_LAYERS)
BY_NAME: dict[str, Param] = {param.name: param for param in PARAMS}
BY_INFOTEXT: dict[str, Param] = {param.infotext: param for param in PARAMS if param.infotext}


@dataclass(frozen=True)
class SegParams:
    """Validated SEG settings for one generation. Field order = ``PARAMS`` order."""

    enabled: bool = ENABLED.default
    scale: float = SCALE.default
    blur_sigma: float = BLUR_SIGMA.default
    layers: str = LAYERS.default
    start: float = START.default
    end: float = END.default
    rescale: float = RESCALE.default
    rescale_mode: str = RESCALE_MODE.default
    hires: str = HIRES.default
    hires_scale: float = HIRES_SCALE.default
    hires_blur_sigma: float = HIRES_BLUR_SIGMA.default
    hires_layers: str = HIRES_LAYERS.default

    def __post_init__(self) -> None:
        for param in PARAMS:
            object.__setattr__(self, param.name, param.check(getattr(self, param.name)))
        if self.start > self.end:
            raise ValueError(
                f"SEG start (start) must not be after SEG end (end); got start={self.start!r}, end={self.end!r}"
            )

    def values(self) -> list[Any]:
        """Positional values in table order (the API's ``args`` list)."""
        return [getattr(self, param.name) for param in PARAMS]


assert [f.name for f in fields(SegParams)] == [param.name for param in PARAMS]


def params_from_args(args: Sequence[Any] | Mapping[str, Any] | None) -> SegParams:
    """Settings from API/UI arguments: a positional list in table order (missing trailing values keep
    their defaults), a mapping of named fields, or a one-element list holding such a mapping."""
    if args is None:
        return SegParams()
    if isinstance(args, Sequence) and not isinstance(args, str) and len(args) == 1 and isinstance(args[0], Mapping):
        args = args[0]
    if isinstance(args, Mapping):
        unknown = sorted(str(key) for key in args if key not in BY_NAME)
        if unknown:
            raise ValueError(f"SEG: unknown argument(s) {', '.join(unknown)}; known: {', '.join(BY_NAME)}")
        return SegParams(**dict(args))
    if isinstance(args, str) or not isinstance(args, Sequence):
        raise ValueError(f"SEG: arguments must be a list or an object of named fields; got {args!r}")
    if len(args) > len(PARAMS):
        raise ValueError(f"SEG: at most {len(PARAMS)} arguments ({', '.join(BY_NAME)}); got {len(args)}")
    return SegParams(**{param.name: value for param, value in zip(PARAMS, args, strict=False)})


def for_pass(params: SegParams, hires_pass: bool) -> SegParams | None:
    """The settings SEG runs with in one sampling pass (None: SEG off in it). Only the hires fix pass can
    differ from the generation's settings; the step window and rescale are the same in both passes."""
    if not params.enabled:
        return None
    if not hires_pass or params.hires == "same":
        return params
    if params.hires == "off":
        return None
    return replace(params, scale=params.hires_scale, blur_sigma=params.hires_blur_sigma, layers=params.hires_layers)


def _written(param: Param, params: SegParams, hires_fix: bool) -> bool:
    """Optional keys stay out of infotext at their defaults, so images made before them read the same."""
    if param in RESCALE_PARAMS:
        return params.rescale != RESCALE.default
    if param is HIRES:
        return hires_fix and params.hires != HIRES.default
    if param in HIRES_OVERRIDES:
        return hires_fix and params.hires == "override"
    return True


def to_infotext(params: SegParams, hires_fix: bool = False) -> dict[str, str]:
    """Infotext entries for a generation: empty when SEG is off. ``hires_fix``: the generation has a hires
    pass (only then are the hires settings written, and only when they are not the default)."""
    if not params.enabled:
        return {}
    return {
        param.infotext: param.format(getattr(params, param.name))
        for param in PARAMS
        if param.infotext and _written(param, params, hires_fix)
    }


def has_seg_infotext(fields_: Mapping[str, Any]) -> bool:
    """Whether parsed infotext carries any SEG key (which means SEG was on)."""
    return any(key in fields_ for key in BY_INFOTEXT)


def params_from_infotext(fields_: Mapping[str, Any], *, strict: bool = True) -> tuple[SegParams, list[str]]:
    """Settings from parsed infotext (key -> text). No SEG key: SEG off.

    Strict: a malformed value raises ``ValueError``. Lenient: it is skipped (its default kept) and a
    warning naming it is returned instead, so a paste never breaks.
    """
    if not has_seg_infotext(fields_):
        return SegParams(), []
    values: dict[str, Any] = {"enabled": True}
    warnings: list[str] = []
    for key, param in BY_INFOTEXT.items():
        if key not in fields_:
            continue
        try:
            values[param.name] = param.check(fields_[key])
        except ValueError as exc:
            if strict:
                raise
            warnings.append(f"{key}: {exc}; kept {param.format(param.default)}")
    try:
        return SegParams(**values), warnings
    except ValueError as exc:  # each value is valid alone: start is after end
        if strict:
            raise
        values.pop("start", None)
        values.pop("end", None)
        warnings.append(f"{exc}; kept the default window")
        return SegParams(**values), warnings
