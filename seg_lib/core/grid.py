"""The token grid a UNet attention layer really sees, for any latent size.

Each downsample of the SD/SDXL UNet is a 3x3 convolution with stride 2 and padding 1, which maps a side
``s`` to ``ceil(s / 2)``; the decoder's upsampled maps are brought back to the skip's size. So at depth
``k`` (number of downsamples above the layer) the grid is ``ceil(H / 2**k) x ceil(W / 2**k)`` of the latent,
flattened row-major into ``N = h * w`` tokens. A square-root guess is wrong on most non-square sizes.
"""

from __future__ import annotations

# Deep enough for any UNet in use (SD/SDXL go to depth 3); the loop also stops at a 1x1 grid.
MAX_DEPTH = 8


def _ceil_half(side: int, times: int) -> int:
    return -(-side // (1 << times))


def grid_at_depth(latent_height: int, latent_width: int, depth: int) -> tuple[int, int]:
    """``(h, w)`` of the token grid after ``depth`` stride-2 downsamples of a latent."""
    if latent_height < 1 or latent_width < 1:
        raise ValueError(f"latent size must be positive; got {latent_height}x{latent_width}")
    if depth < 0:
        raise ValueError(f"depth must be >= 0; got {depth}")
    return _ceil_half(latent_height, depth), _ceil_half(latent_width, depth)


def token_grid(
    latent_height: int, latent_width: int, tokens: int, depth: int | None = None
) -> tuple[int, int] | None:
    """The ``(h, w)`` grid holding ``tokens`` queries, or None when no UNet depth has that many tokens.

    With ``depth`` given only that depth is accepted: pass it wherever tokens may have been merged
    (ToMe), since a merged count can equal the token count of a deeper level. Without it the depth is
    found from the count, which is unique because the count strictly falls with depth.
    """
    if depth is not None:
        h, w = grid_at_depth(latent_height, latent_width, depth)
        return (h, w) if h * w == tokens else None
    for level in range(MAX_DEPTH + 1):
        h, w = grid_at_depth(latent_height, latent_width, level)
        if h * w == tokens:
            return h, w
        if h * w < tokens or (h == 1 and w == 1):
            return None
    return None
