"""The token grid a UNet attention layer really sees, for any latent size.

Each downsample of the SD/SDXL UNet is a 3x3 convolution with stride 2 and padding 1, which maps a side
``s`` to ``ceil(s / 2)``; the decoder's upsampled maps are brought back to the skip's size. So at depth
``k`` (number of downsamples above the layer) the grid is ``ceil(H / 2**k) x ceil(W / 2**k)`` of the latent,
flattened row-major into ``N = h * w`` tokens. A square-root guess is wrong on most non-square sizes.
"""

from __future__ import annotations


def _ceil_half(side: int, times: int) -> int:
    return -(-side // (1 << times))


def grid_at_depth(latent_height: int, latent_width: int, depth: int) -> tuple[int, int]:
    """``(h, w)`` of the token grid after ``depth`` stride-2 downsamples of a latent."""
    if latent_height < 1 or latent_width < 1:
        raise ValueError(f"latent size must be positive; got {latent_height}x{latent_width}")
    if depth < 0:
        raise ValueError(f"depth must be >= 0; got {depth}")
    return _ceil_half(latent_height, depth), _ceil_half(latent_width, depth)


def token_grid(latent_height: int, latent_width: int, tokens: int, depth: int) -> tuple[int, int] | None:
    """The ``(h, w)`` grid of a layer ``depth`` downsamples deep, or None when it does not hold ``tokens``.

    None means the layer does not see the plain grid (token merging, an unknown UNet): its queries must not
    be blurred. The depth is required because a merged count can equal the token count of a deeper level
    (ToMe at ratio 0.75 leaves exactly the depth-1 count), so a count alone can name a wrong grid.
    """
    h, w = grid_at_depth(latent_height, latent_width, depth)
    return (h, w) if h * w == tokens else None
