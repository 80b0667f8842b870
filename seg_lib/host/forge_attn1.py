"""The Forge run's ``attn1`` replace patch on a UNet self-attention layer: the SEG rows' queries smoothed on the
layer's grid of this call, then the attention the host would have run there."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from seg_lib.core.blocks import LayerRef
from seg_lib.core.blur import is_infinite
from seg_lib.host.forge_patches import SMOOTH_ROWS, layer_grid, regrouping_hint
from seg_lib.host.marks import owned
from seg_lib.host.one_query import one_query_attention

if TYPE_CHECKING:
    from seg_lib.host.forge import ForgeRun


def attn1_patch(run: ForgeRun, ref: LayerRef, counts: dict[str, int]) -> Any:
    source = run.host.conventions.grid

    @owned
    def attn1(
        q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict[str, Any], inner: Any = None
    ) -> torch.Tensor:
        rows = extra_options.get(SMOOTH_ROWS)
        if rows is not None and rows.stop not in (None, q.shape[0]):
            counts["misplaced"] += 1  # a wrapper regrouped the batch: the marked rows are not these
        elif rows is not None:
            grid = layer_grid(extra_options, source)
            smoothed = run.smoothed(ref, q[rows], grid, regrouping_hint(q, k))
            if smoothed is not None and inner is None and is_infinite(run.params.blur_sigma):
                counts["smoothed"] += 1  # one mean query per row: attention for one query, broadcast
                heads = extra_options["n_heads"]
                return one_query_attention(run.host.attention, q, k, v, heads, rows, smoothed[:, :1])
            if smoothed is not None:
                # The marked rows run to the end of the batch; a new tensor, the host's q stays as it was.
                q = torch.cat([q[: rows.start], smoothed]) if rows.start else smoothed
                counts["smoothed"] += 1
        if inner is not None:  # the attention the host would have run here
            return inner(q, k, v, extra_options)
        return run.host.attention(q, k, v, extra_options["n_heads"])

    return attn1
