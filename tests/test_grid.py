"""The token grid: exact for every latent size, and never a wrong grid for merged tokens."""

from __future__ import annotations

import math

import pytest
import torch

from seg_lib.core.grid import grid_at_depth

SIDES = range(8, 513)
DEPTHS = range(4)


def token_grid(latent_height: int, latent_width: int, tokens: int, depth: int) -> tuple[int, int] | None:
    """The grid of a layer ``depth`` downsamples deep, or None when it does not hold ``tokens``.

    It lives here, not in seg_lib: the hosts take each layer's grid from its real input and make this same
    count check (``Run.smoothed``), so production has no use for a grid predicted from the latent. The tests
    below keep the facts that check relies on: a merged (ToMe) count is never the layer's grid, and only the
    layer's own depth may be asked (a merged count can equal a deeper level's grid).
    """
    h, w = grid_at_depth(latent_height, latent_width, depth)
    return (h, w) if h * w == tokens else None


def _downsample(side: int) -> int:
    # The UNet's Downsample: Conv2d(kernel 3, stride 2, padding 1) -> floor((s + 2 - 3) / 2) + 1.
    return (side + 2 * 1 - 3) // 2 + 1


def _reference_side(side: int, depth: int) -> int:
    for _ in range(depth):
        side = _downsample(side)
    return side


def test_downsample_formula_is_the_real_convolution():
    conv = torch.nn.Conv2d(1, 1, 3, stride=2, padding=1)
    for height, width in [(8, 9), (13, 64), (75, 120), (1, 2), (5, 7)]:
        out = conv(torch.zeros(1, 1, height, width))
        assert tuple(out.shape[-2:]) == (_downsample(height), _downsample(width))


def test_grid_exact_for_every_latent_side_and_depth():
    reference = {(side, depth): _reference_side(side, depth) for side in SIDES for depth in DEPTHS}
    for height in SIDES:
        for width in SIDES:
            for depth in DEPTHS:
                h, w = reference[height, depth], reference[width, depth]
                assert grid_at_depth(height, width, depth) == (h, w)
                assert token_grid(height, width, h * w, depth) == (h, w)


def test_square_root_guess_is_wrong_where_ours_is_right():
    # SDXL 600x960 px: latent 75x120; the middle block (depth 2) is ceil-halved twice to 19x30 = 570.
    assert token_grid(75, 120, 570, 2) == (19, 30)
    assert int(math.sqrt(570 * 75 / 120)) == 18  # the aspect-ratio guess: a wrong grid
    assert math.isqrt(570) ** 2 != 570  # the square-only guess: no grid at all


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.3, 0.5, 0.6, 0.75, 0.9])
def test_merged_token_count_is_no_grid(ratio):
    # ToMe merges int(N * ratio) tokens of the full-resolution layers (depth 0) before attn1.
    for height in range(8, 130, 3):
        for width in range(8, 130, 5):
            tokens = height * width
            merged = tokens - int(tokens * ratio)
            assert token_grid(height, width, merged, 0) is None


def test_merged_count_can_equal_a_deeper_grid_so_depth_decides():
    # 64x64 latent, ratio 0.75: 4096 -> 1024 tokens, exactly the depth-1 count. Only depth 0 is asked.
    assert token_grid(64, 64, 4096 - int(4096 * 0.75), 0) is None
    assert token_grid(64, 64, 1024, 1) == (32, 32)


@pytest.mark.parametrize(("height", "width", "depth"), [(0, 8, 0), (8, -1, 0), (8, 8, -1)])
def test_bad_sizes_raise(height, width, depth):
    with pytest.raises(ValueError, match="must be"):
        grid_at_depth(height, width, depth)
