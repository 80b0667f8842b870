"""Stand-in of A1111's built-in Hypertile (``extensions-builtin/hypertile/hypertile.py``), named like it so
SEG recognises it the way it recognises the real one (by the file its wrapper's code lives in).

Like the real one it wraps ``attn1.forward`` with an instance attribute (``functools.wraps``), splits each
row's token grid into ``nh x nw`` tiles moved into the batch (``b (nh h nw w) c -> (b nh nw) (h w) c``),
draws ``nh``/``nw`` from a module-level ``random.Random`` at every call, and stays installed when off."""

from __future__ import annotations

import functools
import random
from typing import Any

import torch
from torch import nn

RNG_INSTANCE = random.Random()


def _divisor(side: int) -> int:
    options = [n for n in (1, 2, 3) if side % n == 0]
    return options[RNG_INSTANCE.randint(0, len(options) - 1)]


def hook(attn1: nn.Module, height: int, width: int) -> None:
    """Tile ``attn1`` of a layer whose grid is ``height x width`` (the real one finds it from the aspect)."""
    plain = attn1.forward

    @functools.wraps(plain)
    def wrapper(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        nh, nw = _divisor(height), _divisor(width)
        b, n, c = x.shape
        h, w = height // nh, width // nw
        tiles = x.reshape(b, nh, h, nw, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, h * w, c)
        out = plain(tiles, *args, **kwargs)
        return out.reshape(b, nh, nw, h, w, c).permute(0, 1, 3, 2, 4, 5).reshape(b, n, c)

    attn1.forward = wrapper
