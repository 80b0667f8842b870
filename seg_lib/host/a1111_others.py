"""What other extensions left on an A1111 UNet, and whether SEG may fork its branch inside the host's call.

The fork appends the smoothed branch's rows to the host's own UNet call, so it is only safe when every
module of the UNet still treats each row on its own. Extensions replace module forwards (instance
attributes) or register hooks, and many leave them installed between generations. SEG decides before the
call, from what is installed: a replacement that merely forwards to the module's own class (what
sd-webui-controlnet leaves on the UNet after ``restore()``) is idle; a few known replacements are row-wise;
anything else means the step takes the separate extra pass, which every extension handles like the host's
own calls.
"""

from __future__ import annotations

import types
from typing import Any

from torch import nn

from seg_lib.host.marks import is_owned

_REPLACEABLE = ("forward", "_forward")


def _closure_value(function: Any, name: str) -> Any:
    code = getattr(function, "__code__", None)
    for var, cell in zip(getattr(code, "co_freevars", ()), getattr(function, "__closure__", None) or (), strict=False):
        if var == name:
            try:
                return cell.cell_contents
            except ValueError:  # an empty cell
                return None
    return None


def _code(function: Any) -> tuple[str, str]:
    """(file name, function name) of a function's code: what functools.wraps cannot rename."""
    code = getattr(function, "__code__", None)
    if code is None:
        return "", ""
    return code.co_filename.replace("\\", "/").rsplit("/", 1)[-1], code.co_name


def _state_name(value: object) -> str:
    return str(getattr(value, "name", getattr(value, "value", value)))


def _idle_controlnet_hack(function: Any) -> bool:
    """sd-webui-controlnet's reference/StyleAlign hacks stay on the transformer blocks and group norms after
    its run (``restore()`` only puts back the UNet's forward). With its hook object in the Read state and
    the UNet's own forward back in place, they compute exactly the stock block, row by row, and record
    nothing (the banks fill only while ControlNet's own forward runs, in the Write state)."""
    file, name = _code(function)
    if file != "hook.py" or name not in ("hacked_basic_transformer_inner_forward", "hacked_group_norm_forward"):
        return False
    outer = _closure_value(function, "outer")
    if outer is None:
        return False
    return (
        _state_name(getattr(outer, "attention_auto_machine", "Read")) == "Read"
        and _state_name(getattr(outer, "gn_auto_machine", "Read")) == "Read"
    )


def _row_wise_wrapper(function: Any) -> bool:
    """A1111's built-in Hypertile wraps ``attn1.forward`` (and leaves the wrapper installed when off): it
    splits each row's tokens into tiles and puts them back, row by row, so copies of rows stay copies."""
    return _code(function)[0] == "hypertile.py"  # its wrapper takes the wrapped method's names (functools.wraps)


def idle_forward(module: nn.Module, value: Any, name: str = "forward") -> bool:
    """Whether an instance attribute ``name`` of ``module`` only forwards to the module's own class method."""
    own = getattr(type(module), name, None)
    return isinstance(value, types.MethodType) and value.__self__ is module and value.__func__ is own


def _foreign_hooks(module: nn.Module) -> list[Any]:
    hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
    # A1111's --medvram/--lowvram move blocks to the GPU from pre-hooks: row-wise.
    return [
        hook for hook in hooks if not is_owned(hook) and (getattr(hook, "__module__", "") or "") != "modules.lowvram"
    ]


def fork_blocker(unet: nn.Module) -> str | None:
    """Why another extension's state on the UNet's modules rules the fork out, or None when it is safe.
    The UNet's own ``forward`` is checked by ``fork.stock_forward``."""
    for path, module in unet.named_modules():
        if module is unet:
            continue
        attributes = vars(module)
        for name in _REPLACEABLE:
            value = attributes.get(name)
            if value is None or idle_forward(module, value, name):
                continue
            function = getattr(value, "__func__", value)
            if _row_wise_wrapper(function) or _idle_controlnet_hack(function):
                continue
            origin = _code(function)[0] or (getattr(function, "__module__", "") or "?")
            return f"another extension ({origin}) replaces {type(module).__name__}.{name} at {path}"
        if _foreign_hooks(module):
            return f"another extension hooks {type(module).__name__} at {path}"
    return None


def controlnet_forward(value: Any) -> bool:
    """Whether ``value`` (a UNet's ``forward`` attribute) is sd-webui-controlnet's active forward."""
    return _code(getattr(value, "__func__", value)) == ("hook.py", "forward_webui")


def _controlnet_hack(value: Any) -> bool:
    file, name = _code(getattr(value, "__func__", value))
    return file == "hook.py" and name in ("hacked_basic_transformer_inner_forward", "hacked_group_norm_forward")


def seg_blocker(unet: nn.Module) -> str | None:
    """Why SEG cannot run at all next to what is active on the UNet, or None.

    sd-webui-controlnet's reference units and its StyleAlign batch option record the batch's hidden states in
    one pass and read them in the next, inside its own UNet forward, with latents it caches for the batch
    size of the first call and noise drawn at every call: no extra pass of SEG's can see the state the cond
    rows saw (a batch of another size fails inside ControlNet). SEG then makes the image without its term."""
    own = vars(unet).get("forward")
    if own is None or idle_forward(unet, own) or not controlnet_forward(own):
        return None
    if any(_controlnet_hack(vars(module).get(name)) for module in unet.modules() for name in _REPLACEABLE):
        return "a ControlNet reference unit (or its StyleAlign option) shares attention state across UNet calls"
    return None
