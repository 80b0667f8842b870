"""Which self-attention layers SEG smooths: the compact block selector and the UNet layouts it addresses.

Selector syntax (the one the Forge/ComfyUI SEG nodes use), comma-separated, case-insensitive:

- ``d<i>``, ``m<i>``, ``u<i>``: the i-th block *with self-attention* of the encoder (input blocks), the
  middle block, or the decoder (output blocks), counting from 0; every transformer in it.
- ``u0.4``: only transformer 4 of that block; ``d2.2-9``: transformers 2 to 9.
- ``d0-d3`` (or ``d0-3``): blocks 0 to 3; ranges are inclusive.
- ``input4``, ``middle0``, ``output1.2``: a block by its index in ``input_blocks`` / ``output_blocks``
  (the naming of Forge's patcher and of infotext written by other SEG extensions).

So on SD1.x ``d0`` is ``input_blocks[1]`` and ``u0`` is ``output_blocks[3]``; on SDXL ``d0`` is
``input_blocks[4]`` and ``m0`` is all 10 transformers of the middle block.

DiT models are plain stacks of blocks, named by their kind and index in the model's own list (``seg_lib/families``):
``double3`` / ``single0-37`` (Flux, Chroma), ``joint7-9`` (SD3.5), ``layer12-14`` (Lumina 2, Z-Image); ranges and
lists as above.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PARTS = {"d": "input", "m": "middle", "u": "output"}
PREFIXES = {part: prefix for prefix, part in PARTS.items()}
DEFAULT_LAYERS = "m0"

_RAW_ENTRY = re.compile(r"^\s*(input|middle|output)\s*(\d+)(?:\s*\.\s*(\d+)(?:\s*-\s*(\d+))?)?\s*$")
# DiT block kinds: the model's block list each names (Flux/Chroma double_blocks, single_blocks; SD3.5 joint_blocks;
# Lumina 2 / Z-Image layers).
DIT_KINDS = ("double", "single", "joint", "layer")
_KIND = "|".join(DIT_KINDS)
_DIT_ENTRY = re.compile(rf"^\s*({_KIND})\s*(\d+)(?:\s*-\s*({_KIND})?\s*(\d+))?\s*$")
_ENTRY = re.compile(r"^\s*([dmu])\s*(\d+)(?:\s*-\s*([dmu])?\s*(\d+))?(?:\s*\.\s*(\d+)(?:\s*-\s*(\d+))?)?\s*$")


@dataclass(frozen=True)
class AttentionBlock:
    """A UNet block holding a SpatialTransformer (so self-attention layers)."""

    part: str  # "input", "middle" or "output"
    index: int  # position in input_blocks / output_blocks; 0 for the middle block
    transformers: int  # transformer blocks (attn1 layers) in it
    depth: int  # downsamples above it: its tokens lie on grid_at_depth(latent, depth)


@dataclass(frozen=True, order=True)
class LayerRef:
    """One attn1 layer: ``<part>_blocks[index]...transformer_blocks[transformer].attn1``."""

    part: str
    index: int
    transformer: int
    depth: int


@dataclass(frozen=True)
class Selector:
    """One parsed entry: a range of attention blocks of a part, optionally a range of transformers."""

    part: str
    first: int
    last: int
    t_first: int | None = None
    t_last: int | None = None
    raw: bool = False  # first/last are input_blocks/output_blocks indices, not attention-block ordinals

    @property
    def dit(self) -> bool:
        return self.part in DIT_KINDS

    def __str__(self) -> str:
        if self.dit:
            return f"{self.part}{self.first}" if self.first == self.last else f"{self.part}{self.first}-{self.last}"
        prefix = PREFIXES[self.part]
        if self.raw:
            text = f"{self.part}{self.first}"
        elif self.first == self.last:
            text = f"{prefix}{self.first}"
        else:
            text = f"{prefix}{self.first}-{prefix}{self.last}"
        if self.t_first is not None:
            text += f".{self.t_first}" if self.t_first == self.t_last else f".{self.t_first}-{self.t_last}"
        return text


UNetLayout = tuple[AttentionBlock, ...]


def _blocks(part: str, spec: list[tuple[int, int, int]]) -> list[AttentionBlock]:
    return [AttentionBlock(part, index, transformers, depth) for index, transformers, depth in spec]


# The stock layouts (ldm/sgm configs); adapters build the layout from the loaded model instead.
SD1_LAYOUT: UNetLayout = tuple(
    _blocks("input", [(1, 1, 0), (2, 1, 0), (4, 1, 1), (5, 1, 1), (7, 1, 2), (8, 1, 2)])
    + _blocks("middle", [(0, 1, 3)])
    + _blocks(
        "output",
        [(i, 1, 2) for i in (3, 4, 5)] + [(i, 1, 1) for i in (6, 7, 8)] + [(i, 1, 0) for i in (9, 10, 11)],
    )
)
SD2_LAYOUT: UNetLayout = SD1_LAYOUT
SDXL_LAYOUT: UNetLayout = tuple(
    _blocks("input", [(4, 2, 1), (5, 2, 1), (7, 10, 2), (8, 10, 2)])
    + _blocks("middle", [(0, 10, 2)])
    + _blocks("output", [(0, 10, 2), (1, 10, 2), (2, 10, 2), (3, 2, 1), (4, 2, 1), (5, 2, 1)])
)


def parse_layers(text: str) -> tuple[Selector, ...]:
    """Parse a selector string (syntax only). Raises ``ValueError`` naming ``layers`` and the bad entry."""
    if not isinstance(text, str):
        raise ValueError(f"layers must be a text such as {DEFAULT_LAYERS!r}; got {text!r}")
    entries = [entry for entry in text.split(",") if entry.strip()]
    if not entries:
        raise ValueError(f"layers: select at least one block, e.g. {DEFAULT_LAYERS!r}")
    selectors = []
    for entry in entries:
        dit = _DIT_ENTRY.match(entry.lower())
        if dit is not None:
            kind, first, end_kind, last = dit.groups()
            if end_kind is not None and end_kind != kind:
                raise ValueError(f"layers: {entry.strip()!r} mixes block kinds in one range")
            selectors.append(_selector(entry, kind, first, last or first, None, None, raw=False))
            continue
        raw = _RAW_ENTRY.match(entry.lower())
        if raw is not None:
            part, index, t_first, t_last = raw.groups()
            selectors.append(_selector(entry, part, index, index, t_first, t_last, raw=True))
            continue
        match = _ENTRY.match(entry.lower())
        if match is None:
            raise ValueError(
                f"layers: cannot read {entry.strip()!r}; use d<i>, m<i> or u<i>, "
                "optionally with a range (d0-d3) and a transformer index (u0.4, d2.2-9), "
                "or a DiT block: double<i>, single<i>, joint<i>, layer<i> (ranges: joint7-9)"
            )
        prefix, first, end_prefix, last, t_first, t_last = match.groups()
        if end_prefix is not None and end_prefix != prefix:
            raise ValueError(f"layers: {entry.strip()!r} mixes block kinds in one range")
        selectors.append(_selector(entry, PARTS[prefix], first, last or first, t_first, t_last, raw=False))
    return tuple(selectors)


def _selector(
    entry: str, part: str, first: str, last: str, t_first: str | None, t_last: str | None, *, raw: bool
) -> Selector:
    selector = Selector(
        part=part,
        first=int(first),
        last=int(last),
        t_first=int(t_first) if t_first is not None else None,
        t_last=int(t_last if t_last is not None else t_first) if t_first is not None else None,
        raw=raw,
    )
    if selector.last < selector.first or (
        selector.t_first is not None and selector.t_last is not None and selector.t_last < selector.t_first
    ):
        raise ValueError(f"layers: {entry.strip()!r} has a range that ends before it starts")
    return selector


def normalize_layers(text: str) -> str:
    """The canonical spelling of a selector (validated for syntax), as written to infotext."""
    return ",".join(str(selector) for selector in parse_layers(text))


def describe_layout(layout: UNetLayout) -> str:
    """The selectors a model accepts, e.g. ``d0-d5, m0, u0-u8 (1 transformer each)``."""
    groups = []
    for part, prefix in PREFIXES.items():
        blocks = [block for block in layout if block.part == part]
        if not blocks:
            continue
        name = f"{prefix}0" if len(blocks) == 1 else f"{prefix}0-{prefix}{len(blocks) - 1}"
        counts = [block.transformers for block in blocks]
        if len(set(counts)) == 1:
            detail = f"{counts[0]} transformer{'s' if counts[0] > 1 else ''}"
            detail += " each" if len(blocks) > 1 else ""
        else:
            detail = "transformers " + " ".join(f"{prefix}{i}:{n}" for i, n in enumerate(counts))
        groups.append(f"{name} ({detail})")
    return ", ".join(groups)


def resolve_layers(layers: str | tuple[Selector, ...], layout: UNetLayout) -> tuple[LayerRef, ...]:
    """The attn1 layers a selector picks in ``layout``, sorted and without repeats.

    Raises ``ValueError`` naming the bad entry and listing the valid selectors for this model.
    """
    selectors = parse_layers(layers) if isinstance(layers, str) else layers
    by_part = {part: [block for block in layout if block.part == part] for part in PARTS.values()}
    picked: set[LayerRef] = set()
    for selector in selectors:
        if selector.dit:
            raise ValueError(
                f"layers: {str(selector)!r} is a DiT block, and this model is a UNet; valid: {describe_layout(layout)}"
            )
        blocks = by_part[selector.part]
        if selector.raw:
            chosen = [block for block in blocks if block.index == selector.first]
        else:
            chosen = blocks[selector.first : selector.last + 1] if selector.last < len(blocks) else []
        if not chosen:
            raise ValueError(f"layers: {str(selector)!r} is not in this model; valid: {describe_layout(layout)}")
        for block in chosen:
            if selector.t_first is None:
                wanted = range(block.transformers)
            else:
                assert selector.t_last is not None
                if selector.t_last >= block.transformers:
                    prefix = PREFIXES[block.part]
                    raise ValueError(
                        f"layers: {str(selector)!r} asks for transformer {selector.t_last}, but "
                        f"{prefix}{blocks.index(block)} has {block.transformers} "
                        f"(0-{block.transformers - 1}); valid: {describe_layout(layout)}"
                    )
                wanted = range(selector.t_first, selector.t_last + 1)
            picked.update(LayerRef(block.part, block.index, t, block.depth) for t in wanted)
    order = {"input": 0, "middle": 1, "output": 2}
    return tuple(sorted(picked, key=lambda ref: (order[ref.part], ref.index, ref.transformer)))


# A DiT's blocks SEG can smooth: (kind, count) per block list, in the order the model runs them.
DitLayout = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class DitRef:
    """One DiT block: ``<kind>_blocks[index]`` of the model."""

    kind: str
    index: int

    def __str__(self) -> str:
        return f"{self.kind}{self.index}"


def describe_dit(layout: DitLayout) -> str:
    """The selectors a DiT accepts, e.g. ``double0-18, single0-37``."""
    return ", ".join(f"{kind}0" if count == 1 else f"{kind}0-{count - 1}" for kind, count in layout if count)


def resolve_dit(layers: str | tuple[Selector, ...], layout: DitLayout, family: str) -> tuple[DitRef, ...]:
    """The DiT blocks a selector picks, in the order the model runs them, without repeats.

    Raises ``ValueError`` naming the bad entry and listing the valid blocks of this ``family``."""
    selectors = parse_layers(layers) if isinstance(layers, str) else layers
    counts = dict(layout)
    picked: set[DitRef] = set()
    for selector in selectors:
        if not selector.dit:
            raise ValueError(
                f"layers: {str(selector)!r} is a UNet block, and this model is {family} (a DiT); "
                f"valid: {describe_dit(layout)}"
            )
        if selector.last >= counts.get(selector.part, 0):
            raise ValueError(f"layers: {str(selector)!r} is not in this {family} model; valid: {describe_dit(layout)}")
        picked.update(DitRef(selector.part, index) for index in range(selector.first, selector.last + 1))
    order = {kind: position for position, (kind, _) in enumerate(layout)}
    return tuple(sorted(picked, key=lambda ref: (order[ref.kind], ref.index)))
