"""How the SEG prediction is combined with the host's CFG result, and when SEG runs at all.

Official SEG-SDXL combination (in the model's output space, which may be eps or x0: it is linear, so both
give the same sampler step):

    out = cfg_result + scale * (cond - cond_seg)

``cond_seg`` is the conditional prediction made with smoothed self-attention queries. Without CFG
(scale 1, condition-free) ``cfg_result`` is simply ``cond``.

Rescale (0..1, 0 = the plain formula above, bit for bit) tempers the SEG term, as the modes of the
Forge/ComfyUI SEG extension (pamparamm/sd-perturbed-attention) define them, with ``term = scale * (cond -
cond_seg)`` and ``r`` the rescale factor:

- ``full``: ``cfg_result + term * (r * std(cond) / std(cfg_result + term) + 1 - r)``, std per image;
- ``partial``: the same with ``std(cond + term)`` in the denominator;
- ``snf`` (saliency-adaptive noise fusion): ``uncond + fuse(cfg_result - uncond, term)``, where ``fuse``
  keeps, per latent element, whichever term is more salient (softmax over the image of its 3x3-blurred
  magnitude, per channel). That extension applies it whole whatever its rescale value; here ``r`` blends
  from the plain result (0) to it (1). Without an uncond prediction (CFG 1 with the host skipping it) there
  is no CFG term to fuse and the plain result stays.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from seg_lib.core.params import SegParams

# Slack for float rounding of step / (steps - 1) at the inclusive window edges.
_EDGE = 1e-9


def cond_weights(
    conds_list: Sequence[Sequence[tuple[int, float]]],
    cond_rows: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``[images, cond_rows]`` weights from A1111's ``conds_list`` (per image: ``(row, weight)`` pairs).

    An AND prompt gives an image several weighted cond rows; the host scales each one's CFG term by its
    weight, and the SEG term is weighted the same way.
    """
    weights = torch.zeros(len(conds_list), cond_rows, dtype=dtype, device=device)
    for image, pairs in enumerate(conds_list):
        for row, weight in pairs:
            if not 0 <= row < cond_rows:
                raise ValueError(f"cond row {row} of image {image} is outside the {cond_rows} cond rows")
            weights[image, row] += weight
    return weights


def seg_guidance(
    cfg_result: torch.Tensor,
    cond: torch.Tensor,
    cond_seg: torch.Tensor,
    scale: float,
    weights: torch.Tensor | None = None,
    *,
    rescale: float = 0.0,
    mode: str = "full",
    uncond: torch.Tensor | None = None,
) -> torch.Tensor:
    """``cfg_result + scale * (cond - cond_seg)``, per image, then rescaled (see the module docstring).

    ``cond`` and ``cond_seg`` hold one row per cond row. Without ``weights`` there is one cond row per
    image (row i belongs to image i). With ``weights`` (``[images, cond_rows]``, see ``cond_weights``)
    image i gets ``scale * sum_j weights[i, j] * (cond[j] - cond_seg[j])``, and its cond prediction for
    the rescale is the weighted mean of its cond rows. ``uncond`` (one row per image) is only read by
    ``snf``.
    """
    if cond.shape != cond_seg.shape:
        raise ValueError(f"cond {tuple(cond.shape)} and cond_seg {tuple(cond_seg.shape)} differ in shape")
    delta = cond - cond_seg
    if weights is None:
        if delta.shape != cfg_result.shape:
            raise ValueError(
                f"one cond row per image expected: cond {tuple(cond.shape)}, result {tuple(cfg_result.shape)}"
            )
        if not rescale:
            return cfg_result + scale * delta
        return rescaled(cfg_result, scale * delta, cond, rescale, mode, uncond)
    images, rows = weights.shape
    if rows != delta.shape[0] or images != cfg_result.shape[0]:
        raise ValueError(
            f"weights {tuple(weights.shape)} do not match {delta.shape[0]} cond rows and {cfg_result.shape[0]} images"
        )
    weights = weights.to(delta.dtype)
    term = (weights @ delta.reshape(rows, -1)).reshape(cfg_result.shape)
    if not rescale:
        return cfg_result + scale * term
    return rescaled(cfg_result, scale * term, weighted_cond(weights, cond), rescale, mode, uncond)


def weighted_cond(weights: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """Each image's cond prediction from its weighted AND rows: their weighted mean (as Forge mixes them)."""
    total = weights.sum(dim=1, keepdim=True)
    total = torch.where(total == 0, torch.ones_like(total), total)
    mixed = (weights / total) @ cond.reshape(cond.shape[0], -1)
    return mixed.reshape(weights.shape[0], *cond.shape[1:])


def _std(x: torch.Tensor) -> torch.Tensor:
    return torch.std(x, dim=tuple(range(1, x.dim())), keepdim=True)


def rescaled(
    cfg_result: torch.Tensor,
    term: torch.Tensor,
    cond_pred: torch.Tensor,
    rescale: float,
    mode: str,
    uncond: torch.Tensor | None = None,
) -> torch.Tensor:
    """``cfg_result + term`` with the SEG ``term`` rescaled by ``mode`` at strength ``rescale`` (0..1)."""
    if mode == "snf":
        plain = cfg_result + term
        if uncond is None or not uncond.any() or not (cfg_result - uncond).any():
            return plain  # no uncond prediction (CFG 1 skipped it, or a fake copy of cond): no CFG term
        fused = uncond + snf_fuse(cfg_result - uncond, term)
        return fused if rescale == 1 else plain + rescale * (fused - plain)
    if mode not in ("full", "partial"):
        raise ValueError(f"unknown rescale mode {mode!r}")
    guided = cfg_result + term if mode == "full" else cond_pred + term
    spread = _std(guided)
    # A flat guided prediction (std 0) has nothing to match: leave its term as it is.
    ratio = torch.where(spread > 0, _std(cond_pred) / spread, torch.ones_like(spread))
    return cfg_result + term * (rescale * ratio + (1.0 - rescale))


def _blur3(x: torch.Tensor) -> torch.Tensor:
    """3x3 Gaussian (sigma 1, reflect padding) over the last two dims of ``[B, C, H, W]``, separably; a
    side shorter than 2 is left alone (the kernel clamps to 1 there)."""
    taps = torch.exp(-0.5 * torch.tensor([1.0, 0.0, 1.0]))
    taps = (taps / taps.sum()).to(device=x.device, dtype=x.dtype)
    b, c, h, w = x.shape
    flat = x.reshape(b * c, 1, h, w)
    if w >= 2:
        flat = F.conv2d(F.pad(flat, (1, 1, 0, 0), mode="reflect"), taps.view(1, 1, 1, 3))
    if h >= 2:
        flat = F.conv2d(F.pad(flat, (0, 0, 1, 1), mode="reflect"), taps.view(1, 1, 3, 1))
    return flat.reshape(b, c, h, w)


def _saliency(term: torch.Tensor) -> torch.Tensor:
    """Softmax over each image channel's elements of the blurred magnitude of ``term``."""
    b, c, h, w = term.shape
    return torch.softmax(_blur3(term.abs()).reshape(b * c, h * w), dim=1).reshape(b, c, h, w)


def snf_fuse(cfg_term: torch.Tensor, seg_term: torch.Tensor) -> torch.Tensor:
    """Saliency-adaptive noise fusion: per element, the more salient of the two terms (ties keep CFG's)."""
    if cfg_term.dim() != 4:
        raise ValueError(f"snf needs [batch, channels, height, width] latents; got {tuple(cfg_term.shape)}")
    return torch.where(_saliency(seg_term) > _saliency(cfg_term), seg_term, cfg_term)


def rescale_args(params: SegParams, uncond: torch.Tensor | None) -> dict[str, Any]:
    """The rescale keywords of ``seg_guidance`` for a pass's settings (one call site per host)."""
    return {"rescale": params.rescale, "mode": params.rescale_mode, "uncond": uncond}


def needs_uncond(params: SegParams) -> bool:
    """Whether the pass needs the uncond prediction even at CFG 1 (snf fuses the CFG term)."""
    return params.rescale_mode == "snf" and params.rescale > 0


def step_progress(step: int, total_steps: int) -> float:
    """Where ``step`` (0-based) lies in a pass of ``total_steps``: 0.0 at the first step, 1.0 at the last."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1; got {total_steps}")
    if total_steps == 1:
        return 0.0
    return min(max(step, 0), total_steps - 1) / (total_steps - 1)


def in_step_window(step: int, total_steps: int, start: float, end: float) -> bool:
    """Whether SEG runs at ``step`` of the current sampling pass.

    ``start`` and ``end`` are fractions of the pass, both inclusive, measured by ``step_progress``:
    the first step is at 0.0 and the last at 1.0. So (0, 1) covers every step, (0, 0) only the first,
    (1, 1) only the last, and (0, 0.5) of 11 steps covers steps 0..5. The hires pass and img2img are
    passes of their own. Outside the window the host must not run the extra pass at all.
    """
    progress = step_progress(step, total_steps)
    return start - _EDGE <= progress <= end + _EDGE
