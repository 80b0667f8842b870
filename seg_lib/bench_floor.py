"""The cost floor of SEG's fast path, by counting: what a fork at the first SEG block leaves the extra rows to do.

    <webui>/venv/bin/python -m seg_lib.bench_floor --webui <webui folder> [--model sd15|sdxl] [--size 512]
                                                   [--layers m0] [--cfg 5]

Builds the model's UNet from the WebUI's own ldm/sgm code and config on the ``meta`` device (no weights, no
time), counts the floating-point operations of each block for one row with torch's ``FlopCounterMode``, and
prints the share of a row's work that runs before the fork point (done once) and from it on (done again for
the smoothed copies). With CFG a step runs 2 rows, so the fast path's floor is ``1 + after / 2`` of a plain
CFG step (``1 + after`` at CFG 1); the separate extra pass costs a whole row (1.5x, 2x). Measured ratios
below the floor mean the host's kernels ran the bigger batch more efficiently per row, not less work.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seg_lib.core.blocks import SD1_LAYOUT, SDXL_LAYOUT, resolve_layers
from seg_lib.host.fork import first_block

_CONFIGS = {
    "sd15": ("configs/v1-inference.yaml", "ldm", SD1_LAYOUT, 768, 0),
    "sdxl": ("repositories/generative-models/configs/inference/sd_xl_base.yaml", "sgm", SDXL_LAYOUT, 2048, 2816),
}


def _unet(webui: Path, model: str) -> nn.Module:
    from omegaconf import OmegaConf

    config, family = _CONFIGS[model][:2]
    sys.path[:0] = [
        str(webui / "repositories/stable-diffusion-stability-ai"),
        str(webui / "repositories/generative-models"),
    ]
    params = dict(
        OmegaConf.load(webui / config).model.params.network_config.params
        if family == "sgm"
        else OmegaConf.load(webui / config).model.params.unet_config.params
    )
    params["use_checkpoint"] = False
    if family == "sgm":
        from sgm.modules.diffusionmodules.openaimodel import UNetModel

        params.pop("spatial_transformer_attn_type", None)
    else:
        from ldm.modules.diffusionmodules.openaimodel import UNetModel
    with torch.device("meta"):
        return UNetModel(**params)


def block_flops(unet: nn.Module, size: int, context_dim: int, adm: int) -> tuple[dict[tuple[str, int], int], int]:
    """FLOPs of each block (("input", i), ("middle", 0), ("output", j)) and of the whole UNet, for one row."""
    from torch.utils.flop_counter import FlopCounterMode

    counted: dict[tuple[str, int], int] = {}
    blocks = [(("input", i), b) for i, b in enumerate(unet.input_blocks)]
    blocks += [(("middle", 0), unet.middle_block)] + [(("output", j), b) for j, b in enumerate(unet.output_blocks)]
    handles = []
    for key, block in blocks:
        counter: dict[str, Any] = {}

        def before(_m: nn.Module, _a: Any, counter: dict = counter) -> None:
            counter["mode"] = FlopCounterMode(display=False)
            counter["mode"].__enter__()

        def after(_m: nn.Module, _a: Any, _o: Any, counter: dict = counter, key: tuple = key) -> None:
            counter["mode"].__exit__(None, None, None)
            counted[key] = counter["mode"].get_total_flops()

        handles += [block.register_forward_pre_hook(before), block.register_forward_hook(after)]
    device = next(unet.parameters()).device  # meta for the real sizes: shapes only, nothing computed
    x = torch.zeros(1, 4, size // 8, size // 8, device=device)
    kwargs: dict[str, Any] = {"context": torch.zeros(1, 77, context_dim, device=device)}
    if adm:
        kwargs["y"] = torch.zeros(1, adm, device=device)
    with FlopCounterMode(display=False) as total:
        unet(x, torch.zeros(1, device=device), **kwargs)
    for handle in handles:
        handle.remove()
    return counted, total.get_total_flops()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m seg_lib.bench_floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--webui", required=True, type=Path, help="an A1111 folder (its configs and repositories)")
    parser.add_argument("--model", choices=sorted(_CONFIGS), default="sd15")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--layers", default="m0")
    parser.add_argument("--cfg", type=float, default=5.0)
    args = parser.parse_args(argv)
    _, _, layout, context_dim, adm = _CONFIGS[args.model]
    unet = _unet(args.webui, args.model)
    flops, total = block_flops(unet, args.size, context_dim, adm)
    order = [*(("input", i) for i in range(len(unet.input_blocks))), ("middle", 0)]
    order += [("output", j) for j in range(len(unet.output_blocks))]
    fork = first_block(resolve_layers(args.layers, layout))
    after = sum(flops[key] for key in order[order.index(fork) :]) / total
    rows = 1 if args.cfg == 1 else 2
    share = {part: sum(v for (p, _), v in flops.items() if p == part) / total for part in ("input", "middle", "output")}
    print(
        f"{args.model} at {args.size}x{args.size}: {total / 1e9:.0f} GFLOP per row; encoder {share['input']:.1%},"
        f" middle {share['middle']:.1%}, decoder {share['output']:.1%}"
    )
    print(f"layers {args.layers}: forked at {fork[0]} block {fork[1]}; {after:.1%} of a row runs again for the copy")
    print(
        f"floor per step, {rows} rows (CFG {args.cfg:g}): fast path {1 + after / rows:.3f}x, "
        f"separate pass {1 + 1 / rows:.3f}x"
    )


if __name__ == "__main__":
    main()
