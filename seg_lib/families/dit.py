"""What SEG needs to know of a DiT family: its block lists, where the image tokens sit among a block's
queries, the image-token grid of a call, and which host function gets a block's final queries."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from seg_lib.core.blocks import DitLayout
from seg_lib.host import reading

# The attention kernels the Forge family's DiT code calls with the final queries (after the q norm and RoPE):
# ``attention_function(q, k, v, heads, ..., skip_reshape=...)`` (backend/attention.py), or a module's own
# ``attention(q, k, v, heads, mask=None)`` (Forge main's SD3.5).
KERNELS = ("attention_function", "attention")


@dataclass(frozen=True)
class Site:
    """A module-level name a block's code calls with the final queries: SEG wraps it for the selected blocks."""

    namespace: dict[str, Any]  # the module globals the calling code looks the name up in
    name: str


@dataclass(frozen=True)
class DitFamily:
    """One DiT family (the same block structure across the hosts that run it)."""

    name: str
    stacks: tuple[tuple[str, str], ...]  # (selector kind, the model's ModuleList attribute), in run order
    after: tuple[str, ...]  # modules after the stacks that take per-row inputs (the fork grows them too)
    default_layers: str
    default_source: str  # where the default comes from (for the README and the console)
    text_first: bool  # image tokens right after the text tokens (Flux: txt, img, reference); else the last ones
    ceil_grid: bool  # the latent is padded to whole patches (Flux) rather than cut (SD3.5's strided conv)
    real_cfg: bool  # trained for CFG (else CFG 1, distilled guidance: SEG guides the cond alone)
    is_model: Callable[[nn.Module], bool]
    context_arg: int = 2  # position of ``context`` (the text tokens) in the model's forward
    # The model pads the text tokens to a multiple of this (Z-Image: ``pad_tokens_multiple``); None: as given.
    text_multiple: Callable[[nn.Module], int | None] | None = None
    # Block parameters that hold one value for all rows (never copied for the fork, whatever their length).
    shared_args: tuple[str, ...] = ()
    # Model methods after the stacks that take the rows first and per-row lists made for the host's rows
    # (Forge Neo's ``unpatchify``): on the fork they run on the host's rows and on the copies apart.
    row_methods: tuple[str, ...] = ()

    def text_tokens(self, args: tuple[Any, ...], kwargs: dict[str, Any], model: nn.Module | None = None) -> int:
        """How many text tokens come before the image tokens in a call (0 where the image tokens are last)."""
        if not self.text_first:
            return 0
        context = kwargs.get("context", args[self.context_arg] if len(args) > self.context_arg else None)
        count = int(context.shape[1]) if context is not None else 0
        multiple = self.text_multiple(model) if self.text_multiple is not None and model is not None else None
        return -(-count // multiple) * multiple if multiple else count

    @staticmethod
    def patch(model: nn.Module) -> int:
        """The side of the model's square patches: its ``patch_size`` where it keeps one (Forge Neo's Flux.2:
        1, its Flux, Chroma and Lumina: 2), else 2 (Forge main's Flux has no such attribute)."""
        size = getattr(model, "patch_size", None)
        return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else 2

    def matches(self, model: Any) -> bool:
        has_stacks = all(hasattr(model, attr) for _, attr in self.stacks)
        return isinstance(model, nn.Module) and has_stacks and self.is_model(model)

    def layout(self, model: nn.Module) -> DitLayout:
        return tuple((kind, len(getattr(model, attr))) for kind, attr in self.stacks)

    def block(self, model: nn.Module, kind: str, index: int) -> nn.Module:
        return getattr(model, dict(self.stacks)[kind])[index]

    def grid(self, latent_height: int, latent_width: int, patch: int = 2) -> tuple[int, int]:
        """The image-token grid of a call on a latent of this size (row-major, like the patchify)."""
        if self.ceil_grid:
            return -(-latent_height // patch), -(-latent_width // patch)
        return latent_height // patch, latent_width // patch

    def image_span(self, tokens: int, text_tokens: int, image_tokens: int) -> tuple[int, int]:
        """(start, stop) of the image tokens among a block's ``tokens`` queries."""
        if self.text_first:
            return text_tokens, text_tokens + image_tokens
        return tokens - image_tokens, tokens


def kernel_sites(family: DitFamily, model: nn.Module) -> tuple[Site, ...] | str:
    """Where the host's blocks of this model hand their final queries to attention, read from the blocks'
    code: the kernel they call, or the one the module function they call (``attention``, ``block_mixing``)
    calls in turn, or the one their attention submodule calls (Lumina's ``self.attention(...)``). A string
    says why none was found (SEG then does not apply to this model on this host)."""
    sites: dict[tuple[int, str], Site] = {}
    for _, attr in family.stacks:
        stack = getattr(model, attr)
        if not len(stack):
            continue
        block = stack[0]
        cls = type(block)
        namespace = sys.modules.get(cls.__module__)
        if namespace is None:
            return f"the module of {cls.__name__} is not loaded"
        site = next(
            (found for method in _methods(block) if (found := _site(method, _globals(method, vars(namespace)), 2))),
            None,
        )
        if site is None:
            return f"{cls.__module__}.{cls.__name__} calls no attention function SEG knows"
        sites[(id(site.namespace), site.name)] = site
    return tuple(sites.values()) or "the model has no blocks"


def _globals(function: Any, default: dict[str, Any]) -> dict[str, Any]:
    found = getattr(function, "__globals__", None)
    return found if isinstance(found, dict) else default


def _methods(block: nn.Module, depth: int = 1) -> list[Any]:
    """The block's forward, the methods of its own it calls (``self.run(...)``), and the forwards of the
    host's submodules it calls (``self.attention(...)``: Lumina's attention module), one level down."""
    import ast

    cls = type(block)
    parsed = reading.tree(cls.forward)
    called = (
        []
        if parsed is None
        else [
            node.func.attr
            for node in ast.walk(parsed)
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "self"
        ]
    )
    methods = [cls.forward, *(getattr(cls, name) for name in called if callable(getattr(cls, name, None)))]
    if depth:
        for name in called:
            sub = block._modules.get(name)
            if isinstance(sub, nn.Module) and not type(sub).__module__.startswith("torch."):
                methods.extend(_methods(sub, depth - 1))
    return methods


def _site(function: Any, namespace: dict[str, Any], depth: int) -> Site | None:
    called = reading.called_names(function) or frozenset()
    if "attention_function" in called and callable(namespace.get("attention_function")):
        return Site(namespace, "attention_function")
    for name in ("attention", "block_mixing"):
        inner = namespace.get(name)
        if name in called and callable(inner) and depth:
            found = _site(inner, getattr(inner, "__globals__", namespace), depth - 1)
            if found is not None:
                return found
            if name == "attention" and "scaled_dot_product_attention" in _attributes(inner):
                return Site(getattr(inner, "__globals__", namespace), "attention")  # the kernel itself
    return None


def _attributes(function: Any) -> frozenset[str]:
    import ast

    parsed = reading.tree(function)
    if parsed is None:
        return frozenset()
    return frozenset(node.attr for node in ast.walk(parsed) if isinstance(node, ast.Attribute))


def module_buffers(family: DitFamily, model: nn.Module) -> tuple[str, ...]:
    """Module-level names the model's blocks (or the module functions they call) rebind with ``global``:
    per-call buffers sized for the host's batch (ersatzForge's SD3.5 keeps its joint q/k/v there). The fork
    cannot give the copies theirs, so such a model's copies run through the whole model instead."""
    import ast

    found: set[str] = set()
    functions: list[Any] = [type(model).forward]
    for _, attr in family.stacks:
        stack = getattr(model, attr)
        if len(stack):
            methods = _methods(stack[0])
            functions.extend(methods)
            for method in methods:
                namespace = _globals(method, {})
                called = reading.called_names(method) or frozenset()
                functions.extend(namespace[name] for name in called if callable(namespace.get(name)))
    for function in functions:
        parsed = reading.tree(function)
        if parsed is not None:
            found.update(name for node in ast.walk(parsed) if isinstance(node, ast.Global) for name in node.names)
    return tuple(sorted(found))
