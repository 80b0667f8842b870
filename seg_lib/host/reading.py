"""Reading what the running host's code does, once, from its source: SEG decides calling conventions and
which stock forward a host reproduces from what the host's functions are, not from which package imported.

Everything here takes a function (or class) of the running host and parses its source with ``ast``. A
source that cannot be read, or that has none of the shapes SEG knows, answers None: the caller then takes
the path that needs no knowledge of it (a separate call, no fork, a clean skip).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any


@functools.lru_cache(maxsize=64)
def _tree(function: Any) -> ast.AST | None:
    try:
        source = textwrap.dedent(inspect.getsource(function))
        return ast.parse(source)
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None


def tree(function: Any) -> ast.AST | None:
    """The parsed source of ``function``, or None where Python cannot give it (a builtin, a compiled file)."""
    try:
        return _tree(function)
    except TypeError:  # an unhashable callable
        return None


def _docstrings(node: ast.AST) -> set[int]:
    """ids of the docstring and assert-message constants under ``node`` (prose, not behaviour)."""
    found: set[int] = set()
    for child in ast.walk(node):
        body = getattr(child, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
            found.add(id(first.value))
        if isinstance(child, ast.Assert) and child.msg is not None:
            found.update(id(n) for n in ast.walk(child.msg))
    return found


def strings(function: Any) -> frozenset[str] | None:
    """The string constants ``function`` uses (dict keys, patch kinds, block names), prose left out."""
    parsed = tree(function)
    if parsed is None:
        return None
    prose = _docstrings(parsed)
    return frozenset(
        node.value
        for node in ast.walk(parsed)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in prose
    )


def uses_key(function: Any, key: str) -> bool | None:
    """Whether ``function`` uses the string ``key`` (None: its source cannot be read)."""
    found = strings(function)
    return None if found is None else key in found


def called_names(function: Any, among: Any = None) -> frozenset[str] | None:
    """Names of the plain functions ``function`` calls (``foo(...)``, not ``x.foo(...)``), limited to the
    names defined in ``among`` (a module) when given: the host functions a forward relies on."""
    parsed = tree(function)
    if parsed is None:
        return None
    names = {
        node.func.id for node in ast.walk(parsed) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    if among is not None:
        names = {name for name in names if callable(getattr(among, name, None))}
    return frozenset(names)


def reads_attribute(function: Any, name: str) -> bool:
    """Whether ``function`` reads an attribute called ``name`` (``self._forward``)."""
    parsed = tree(function)
    return parsed is not None and any(isinstance(n, ast.Attribute) and n.attr == name for n in ast.walk(parsed))


def fingerprint(function: Any, among: Any = None) -> str | None:
    """A short id of what ``function`` reads and calls: its string constants and the host functions it
    calls. Two versions of a forward with the same id read the same options and patches in the same
    vocabulary; one that reads a new key or calls a new host function gets a new id."""
    found, calls = strings(function), called_names(function, among)
    if found is None or calls is None:
        return None
    text = "\n".join(sorted(found)) + "\n--\n" + "\n".join(sorted(calls))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def pre_cfg_convention(function: Any) -> str | None:
    """How ``function`` (the host's sampling function) calls ``sampler_pre_cfg_function`` entries:

    - ``"positional"``: ``fn(model, cond, uncond, x, timestep, model_options)``, its 6 values taken back,
      before the UNet call (Forge, Forge Classic, the 2024 Forge);
    - ``"args"``: ``fn(args)`` with one dict, after the UNet call, its return value taken as the conds'
      output (reForge, ComfyUI);
    - None: no such loop, or one of another shape.
    """
    parsed = tree(function)
    if parsed is None:
        return None
    for loop in ast.walk(parsed):
        if not isinstance(loop, ast.For) or not isinstance(loop.target, ast.Name):
            continue
        if not any(isinstance(n, ast.Constant) and n.value == "sampler_pre_cfg_function" for n in ast.walk(loop.iter)):
            continue
        for node in ast.walk(ast.Module(body=loop.body, type_ignores=[])):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == loop.target.id:
                if len(node.args) == 6 and not node.keywords:
                    return "positional"
                if len(node.args) == 1 and not node.keywords:
                    return "args"
                return None
    return None


@dataclass(frozen=True)
class BatchTest:
    """The host's test for putting chunks in one UNet call: ``model.memory_required(shape[, cond_shapes])
    * factor < free memory``."""

    factor: float = 1.0
    cond_shapes: bool = False  # the estimate is given the conds' shapes (``cond_shapes=``)


def _memory_call(node: ast.AST) -> tuple[ast.Call, float] | None:
    """``x.memory_required(...)``, possibly times a number, as (call, factor)."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "memory_required":
        return node, 1.0
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        for call, number in ((node.left, node.right), (node.right, node.left)):
            inner = _memory_call(call)
            if inner is not None and isinstance(number, ast.Constant) and isinstance(number.value, (int, float)):
                return inner[0], inner[1] * float(number.value)
    return None


def batch_test(function: Any) -> BatchTest | None:
    """The memory test in ``function`` (the host's cond batching), or None when it has not exactly one of
    the shape ``memory_required(...) [* k] < free``."""
    parsed = tree(function)
    if parsed is None:
        return None
    found = []
    for node in ast.walk(parsed):
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and isinstance(node.ops[0], ast.Lt):
            call = _memory_call(node.left)
            if call is not None:
                found.append(call)
    if len(found) != 1:
        return None
    call, factor = found[0]
    if len(call.args) != 1:
        return None
    keywords = {keyword.arg for keyword in call.keywords}
    if not keywords <= {"cond_shapes"}:
        return None
    return BatchTest(factor, "cond_shapes" in keywords)
