"""Straightforward 2D reference blurs, written from the description of the official SEG-SDXL blur.

They are slow on purpose (a full 2D kernel and an explicit pad), so that the separable implementation in
``seg_lib.core.blur`` is checked against the plain definition rather than against itself.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def official_kernel_size(sigma: float) -> int:
    span = math.ceil(6 * sigma)
    return span + 1 - span % 2


def gaussian_taps(size: int, sigma: float) -> torch.Tensor:
    half = (size - 1) / 2
    x = torch.linspace(-half, half, size, dtype=torch.float32)
    pdf = torch.exp(-0.5 * (x / sigma) ** 2)
    return pdf / pdf.sum()


def _blur_2d(img: torch.Tensor, kernel_h: int, kernel_w: int, sigma: float) -> torch.Tensor:
    taps_h = gaussian_taps(kernel_h, sigma).to(img.dtype)
    taps_w = gaussian_taps(kernel_w, sigma).to(img.dtype)
    kernel = torch.outer(taps_h, taps_w)
    channels = img.shape[1]
    weight = kernel.expand(channels, 1, kernel_h, kernel_w)
    padded = F.pad(img, [kernel_w // 2, kernel_w // 2, kernel_h // 2, kernel_h // 2], mode="reflect")
    return F.conv2d(padded, weight, groups=channels)


def official_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """The official blur: square kernel clamped by the grid width only (valid on square grids)."""
    width = img.shape[-1]
    size = min(official_kernel_size(sigma), width - (width % 2 - 1))
    return _blur_2d(img, size, size, sigma)


def per_dimension_blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """The official blur with the width clamp applied to each dimension with its own size."""
    height, width = img.shape[-2:]
    size = official_kernel_size(sigma)
    return _blur_2d(img, min(size, height - (height % 2 - 1)), min(size, width - (width % 2 - 1)), sigma)


def tokens_to_map(q: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[B, N, C]`` row-major tokens to a ``[B, C, H, W]`` map."""
    batch, _, channels = q.shape
    return q.transpose(1, 2).reshape(batch, channels, height, width)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    batch, channels = x.shape[:2]
    return x.reshape(batch, channels, -1).transpose(1, 2)
