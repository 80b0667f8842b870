"""The token grid a UNet attention layer really sees, for any latent size.

Each downsample of the SD/SDXL UNet is a 3x3 convolution with stride 2 and padding 1, which maps a side
``s`` to ``ceil(s / 2)``; the decoder's upsampled maps are brought back to the skip's size. So at depth
``k`` (number of downsamples above the layer) the grid is ``ceil(H / 2**k) x ceil(W / 2**k)`` of the latent,
flattened row-major into ``N = h * w`` tokens. A square-root guess is wrong on most non-square sizes.
The hosts read each layer's grid from its real input (Deep Shrink, tiles and hires passes change it); this
predicts it from the latent, for the benchmark's layer tables.
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
