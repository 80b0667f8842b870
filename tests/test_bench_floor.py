"""The fork's cost floor counts each block's work once, at the latent's size."""

from __future__ import annotations

from seg_lib.bench_floor import block_flops
from tests.standins import CONTEXT, TinyUNet


def test_blocks_hold_the_work_and_it_grows_with_the_grid() -> None:
    unet = TinyUNet()
    flops, total = block_flops(unet, 64, CONTEXT, 0)
    keys = [("input", i) for i in range(len(unet.input_blocks))]
    keys += [("middle", 0)] + [("output", j) for j in range(len(unet.output_blocks))]
    assert sorted(flops) == sorted(keys)
    assert all(value > 0 for value in flops.values())
    outside = total - sum(flops.values())  # the time embedding and the output conv
    assert 0 < outside < 0.2 * total
    bigger, bigger_total = block_flops(unet, 128, CONTEXT, 0)
    # 4x the tokens: a block of convolutions only costs exactly 4x; one with attention more than 2x (its
    # cross-attention's keys and values come from the 77 context tokens, which do not grow)
    convs_only = [key for key in keys if not any(type(m).__name__ == "SpatialTransformer" for m in block(unet, key))]
    assert convs_only
    assert all(bigger[key] == 4 * flops[key] for key in convs_only)
    assert all(bigger[key] > 2 * flops[key] for key in keys)
    assert bigger_total > 3 * total


def block(unet: TinyUNet, key: tuple[str, int]) -> TinyUNet:
    part, index = key
    return unet.middle_block if part == "middle" else getattr(unet, f"{part}_blocks")[index]
