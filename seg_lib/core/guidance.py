"""How the SEG prediction is combined with the host's CFG result, and when SEG runs at all.

Official SEG-SDXL combination (in the model's output space, which may be eps or x0: it is linear, so both
give the same sampler step):

    out = cfg_result + scale * (cond - cond_seg)

``cond_seg`` is the conditional prediction made with smoothed self-attention queries. Without CFG
(scale 1, condition-free) ``cfg_result`` is simply ``cond``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

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
) -> torch.Tensor:
    """``cfg_result + scale * (cond - cond_seg)``, per image.

    ``cond`` and ``cond_seg`` hold one row per cond row. Without ``weights`` there is one cond row per
    image (row i belongs to image i). With ``weights`` (``[images, cond_rows]``, see ``cond_weights``)
    image i gets ``scale * sum_j weights[i, j] * (cond[j] - cond_seg[j])``.
    """
    if cond.shape != cond_seg.shape:
        raise ValueError(f"cond {tuple(cond.shape)} and cond_seg {tuple(cond_seg.shape)} differ in shape")
    delta = cond - cond_seg
    if weights is None:
        if delta.shape != cfg_result.shape:
            raise ValueError(
                f"one cond row per image expected: cond {tuple(cond.shape)}, result {tuple(cfg_result.shape)}"
            )
        return cfg_result + scale * delta
    images, rows = weights.shape
    if rows != delta.shape[0] or images != cfg_result.shape[0]:
        raise ValueError(
            f"weights {tuple(weights.shape)} do not match {delta.shape[0]} cond rows and {cfg_result.shape[0]} images"
        )
    term = weights.to(delta.dtype) @ delta.reshape(rows, -1)
    return cfg_result + scale * term.reshape(cfg_result.shape)


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
