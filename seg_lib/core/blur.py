"""Gaussian smoothing of self-attention queries over the 2D token grid.

This is the blur of Smoothed Energy Guidance (Hong, NeurIPS 2024) with the official SEG-SDXL semantics:
kernel size ``ceil(6 sigma) + 1`` rounded to odd, a Gaussian normalised to sum 1 built in float32,
reflect padding, and ``sigma > 9999`` meaning "replace every query by the grid mean".

The official 2D kernel is the outer product of a 1D kernel, so it is applied separably: one 1D pass down
the rows, one across the columns. Each pass is a multiplication by a small ``size x size`` matrix that
holds the reflect-padded kernel (a banded Toeplitz matrix with the mirrored taps folded in). That is the
same linear map as pad-then-convolve, works on the token layout ``[B, N, C]`` without transposes, and runs
as a batched matmul, so there is no padding error on tiny grids and no Python loop over tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import torch

# The official code treats sigma above this as infinite blur (the mean query).
INFINITE_SIGMA_THRESHOLD = 9999.0

RowSelection = slice | Sequence[int] | torch.Tensor


def validate_sigma(sigma: object) -> float:
    """Return ``sigma`` as a float, or raise ``ValueError`` naming the blur sigma."""
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)):
        raise ValueError(f"blur sigma must be a positive number (inf for infinite blur); got {sigma!r}")
    value = float(sigma)
    if math.isnan(value) or value <= 0:
        raise ValueError(f"blur sigma must be a positive number (inf for infinite blur); got {sigma!r}")
    return value


def is_infinite(sigma: float) -> bool:
    """True where the official code replaces the queries by their mean."""
    return sigma > INFINITE_SIGMA_THRESHOLD


def kernel_size(sigma: float, side: int) -> int:
    """Odd kernel size for ``sigma``, clamped to a grid side the way the official code clamps the width.

    The clamp keeps ``k // 2 < side`` so reflect padding is defined: ``side + 1`` for an even side,
    ``side`` for an odd one. The official code applies it to the width only; it is applied here to each
    dimension with its own size, which is identical on square grids.
    """
    span = math.ceil(6 * sigma)
    size = span + 1 - (span % 2)
    return min(size, side - (side % 2 - 1))


def gaussian_kernel_1d(size: int, sigma: float) -> torch.Tensor:
    """Normalised float32 Gaussian taps on ``linspace(-(size-1)/2, (size-1)/2, size)``."""
    half = (size - 1) * 0.5
    x = torch.linspace(-half, half, steps=size, dtype=torch.float32)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    return pdf / pdf.sum()


# A generation needs a few (grid side, sigma) pairs; 64 cover an XYZ sweep, and bound a long session's
# memory: a side of 256 (a 2048-pixel image's first layers) is 0.5 MiB in float64.
_CACHED = 64


@lru_cache(maxsize=_CACHED)
def _axis_operator_f64(side: int, sigma: float) -> torch.Tensor:
    """``[side, side]`` matrix M with ``M @ v`` = reflect-pad ``v``, then convolve with the 1D kernel.

    The taps are the official float32 ones; mirrored taps are folded together in float64 so the
    folding adds no rounding of its own.
    """
    size = kernel_size(sigma, side)
    taps = gaussian_kernel_1d(size, sigma).double()
    pad = size // 2
    # Source index of every tap of every output position, mirrored at the edges like F.pad(mode="reflect").
    src = torch.arange(side).unsqueeze(1) + torch.arange(size).unsqueeze(0) - pad
    src = src.abs()
    src = torch.where(src >= side, 2 * (side - 1) - src, src)
    rows = torch.arange(side).unsqueeze(1).expand(side, size)
    op = torch.zeros(side, side, dtype=torch.float64)
    op.index_put_((rows.reshape(-1), src.reshape(-1)), taps.repeat(side), accumulate=True)
    return op


@lru_cache(maxsize=_CACHED)
def _axis_operator(side: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Cast to the input's dtype, as the official kernel is.
    return _axis_operator_f64(side, sigma).to(device=device, dtype=dtype)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision means are summed in float32; float32 and float64 keep their own precision.
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def gaussian_blur_2d(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur every channel of a ``[B, C, H, W]`` map; a new tensor of the same shape, dtype and device."""
    sigma = validate_sigma(sigma)
    if x.dim() != 4:
        raise ValueError(f"gaussian_blur_2d expects a [B, C, H, W] tensor; got shape {tuple(x.shape)}")
    batch, channels, height, width = x.shape
    if is_infinite(sigma):
        mean = x.mean(dim=(-2, -1), keepdim=True, dtype=_accumulation_dtype(x.dtype)).to(x.dtype)
        return mean.expand_as(x).contiguous()
    rows_op = _axis_operator(height, sigma, x.dtype, x.device)
    cols_op = _axis_operator(width, sigma, x.dtype, x.device)
    flat = x.reshape(batch * channels, height, width)
    out = torch.matmul(rows_op, flat)  # blur down each column
    out = torch.matmul(out, cols_op.t())  # blur along each row
    return out.reshape(batch, channels, height, width)


def smooth_queries(q: torch.Tensor, height: int, width: int, sigma: float) -> torch.Tensor:
    """Blur queries ``[B, N, C]`` laid out row-major on a ``height x width`` grid (``N = height * width``).

    Returns a new tensor of the input's shape, dtype and device; ``q`` is not modified.
    """
    sigma = validate_sigma(sigma)
    if q.dim() != 3:
        raise ValueError(f"smooth_queries expects a [B, N, C] tensor; got shape {tuple(q.shape)}")
    batch, tokens, channels = q.shape
    if height < 1 or width < 1 or height * width != tokens:
        raise ValueError(f"a {height}x{width} grid does not hold the {tokens} query tokens")
    if is_infinite(sigma):
        mean = q.mean(dim=1, keepdim=True, dtype=_accumulation_dtype(q.dtype)).to(q.dtype)
        return mean.expand_as(q).contiguous()
    rows_op = _axis_operator(height, sigma, q.dtype, q.device)
    cols_op = _axis_operator(width, sigma, q.dtype, q.device)
    # Row-major tokens: [B, H, W*C] for the pass down the columns, [B*H, W, C] for the pass along rows.
    out = torch.matmul(rows_op, q.reshape(batch, height, width * channels))
    out = torch.matmul(cols_op, out.reshape(batch * height, width, channels))
    return out.reshape(batch, tokens, channels)


def smooth_query_rows_(q: torch.Tensor, height: int, width: int, sigma: float, rows: RowSelection) -> None:
    """Blur, in place, only the batch rows ``rows`` of ``q``; the other rows are neither read nor copied."""
    if isinstance(rows, slice):
        part = q[rows]  # a view
        part.copy_(smooth_queries(part, height, width, sigma))
        return
    index = torch.as_tensor(rows, dtype=torch.long, device=q.device)
    q.index_copy_(0, index, smooth_queries(q.index_select(0, index), height, width, sigma))
