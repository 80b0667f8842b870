"""Benchmark: what the SEG query blur costs next to the work it rides on.

    python -m seg_lib.bench            # layer table + whole-pass table (the latter needs diffusers)
    python -m seg_lib.bench --quick    # fewer repetitions, 512x512 only
    python -m seg_lib.bench --threads 1  # one torch thread (steadier on a busy machine)

Layer table: for each self-attention level of SD1.5 and SDXL at 512x512 and 1024x1024, the time of
``smooth_queries`` on one row of queries next to the attention (PyTorch SDPA, same shapes) it feeds.
Smoothed-attention table: the self-attention of one smoothed row, blur included, at a finite sigma (blur,
then attention for every query) and at sigma = inf (the mean query, then attention for that one query,
broadcast: ``host/one_query.py``).
Whole-pass table: one conditional UNet pass of the real architecture (diffusers' UNet2DConditionModel,
random weights) with the blur hooked into the middle block's queries, next to the same pass without it;
the blur's own time is summed inside the hooks. Each pair of numbers is measured interleaved in one run.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from seg_lib.core.blur import smooth_queries
from seg_lib.core.grid import grid_at_depth
from seg_lib.host.one_query import one_query_attention

SIGMAS = (1.0, 10.0, math.inf)


@dataclass(frozen=True)
class Level:
    name: str
    depth: int
    channels: int
    heads: int
    layers_in_middle: int = 0  # attn1 layers of the middle block at this level (0: not the middle)


MODELS: dict[str, tuple[Level, ...]] = {
    "SD1.5": (
        Level("depth 0", 0, 320, 8),
        Level("depth 1", 1, 640, 8),
        Level("depth 2", 2, 1280, 8),
        Level("middle", 3, 1280, 8, layers_in_middle=1),
    ),
    "SDXL": (
        Level("depth 1", 1, 640, 10),
        Level("depth 2", 2, 1280, 20),
        Level("middle", 2, 1280, 20, layers_in_middle=10),
    ),
}


def _median_pair(first: Callable[[], object], second: Callable[[], object], reps: int) -> tuple[float, float]:
    """Median seconds of two callables, run alternately so both see the same machine state."""
    first(), second()  # warm-up (operator caches, allocator)
    a, b = [], []
    for _ in range(reps):
        start = time.perf_counter()
        first()
        a.append(time.perf_counter() - start)
        start = time.perf_counter()
        second()
        b.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


@dataclass(frozen=True)
class Case:
    """One attention layer to time: its model, image size, level, token grid, random q/k/v and repetitions."""

    model: str
    size: int
    level: Level
    h: int
    w: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    reps: int


def _cases(sizes: tuple[int, ...], reps: int) -> Iterator[Case]:
    """Every level of every model at every size, with the same seeded inputs in every table."""
    gen = torch.Generator().manual_seed(0)
    for model, levels in MODELS.items():
        for size in sizes:
            latent = size // 8
            for level in levels:
                h, w = grid_at_depth(latent, latent, level.depth)
                q, k, v = (torch.randn(1, h * w, level.channels, generator=gen) for _ in range(3))
                reps_here = max(2, reps // 4) if h * w >= 8192 else reps  # the largest grids take long
                yield Case(model, size, level, h, w, q, k, v, reps_here)


def layer_table(sizes: tuple[int, ...], reps: int) -> list[str]:
    lines = [
        "| model | image | layer | grid | C | sigma | blur ms | attention ms | blur/attention |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for case in _cases(sizes, reps):
        h, w, level = case.h, case.w, case.level
        heads = [t.view(1, h * w, level.heads, -1).transpose(1, 2) for t in (case.q, case.k, case.v)]

        def attention(heads: list[torch.Tensor] = heads) -> torch.Tensor:
            return F.scaled_dot_product_attention(*heads)

        for sigma in SIGMAS:

            def blur(q: torch.Tensor = case.q, h: int = h, w: int = w, s: float = sigma) -> torch.Tensor:
                return smooth_queries(q, h, w, s)

            t_blur, t_attn = _median_pair(blur, attention, case.reps)
            lines.append(
                f"| {case.model} | {case.size} | {level.name} | {h}x{w} | {level.channels} | {sigma:g} | "
                f"{t_blur * 1e3:.3f} | {t_attn * 1e3:.3f} | {t_blur / t_attn:.2%} |"
            )
    return lines


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Forge's PyTorch attention: ``[B, N, heads * d]`` in and out."""
    b, _, c = q.shape
    split = [t.view(b, -1, heads, c // heads).transpose(1, 2) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*split).transpose(1, 2).reshape(b, -1, c)


def _looped(function: Callable[[], object], at_least: float = 0.05) -> tuple[Callable[[], None], int]:
    """``function`` repeated enough times to take ``at_least`` seconds, and that count: a sub-millisecond
    operation timed alone mostly measures the scheduler on a busy machine."""
    start = time.perf_counter()
    function()
    count = max(1, math.ceil(at_least / max(time.perf_counter() - start, 1e-6)))

    def looped() -> None:
        for _ in range(count):
            function()

    return looped, count


def _smoothed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], heads: int, sigma: float
) -> tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]:
    def finite() -> torch.Tensor:
        return _sdpa(smooth_queries(q, *grid, sigma), k, v, heads)

    def infinite() -> torch.Tensor:
        mean = smooth_queries(q, *grid, math.inf)[:, :1]  # the adapters' path: the grid-checked mean
        return one_query_attention(_sdpa, q, k, v, heads, slice(0, None), mean)

    return finite, infinite


def smoothed_attention_table(sizes: tuple[int, ...], reps: int, sigma: float = 10.0) -> list[str]:
    """One smoothed row's self-attention, blur included: finite ``sigma`` vs sigma = inf (one query)."""
    lines = [
        f"| model | image | layer | grid | sigma {sigma:g} ms | sigma inf ms | inf / finite |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in _cases(sizes, reps):
        (finite, n_finite), (infinite, n_inf) = map(
            _looped, _smoothed_attention(case.q, case.k, case.v, (case.h, case.w), case.level.heads, sigma)
        )
        t_finite, t_inf = _median_pair(finite, infinite, case.reps)
        t_finite, t_inf = t_finite / n_finite, t_inf / n_inf
        lines.append(
            f"| {case.model} | {case.size} | {case.level.name} | {case.h}x{case.w} | {t_finite * 1e3:.3f} | "
            f"{t_inf * 1e3:.3f} | {t_inf / t_finite:.2%} |"
        )
    return lines


def _diffusers_unet(model: str) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    if model == "SD1.5":
        return UNet2DConditionModel(cross_attention_dim=768, attention_head_dim=8)
    return UNet2DConditionModel(
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )


def _measure_pass(model: str, size: int, reps: int, sigma: float) -> str:
    """One table row: a conditional UNet pass with and without the middle-block blur, interleaved."""
    torch.manual_seed(0)
    unet = _diffusers_unet(model).eval()
    latent = size // 8
    depth = next(level.depth for level in MODELS[model] if level.layers_in_middle)
    h, w = grid_at_depth(latent, latent, depth)
    x = torch.randn(1, 4, latent, latent)
    context = torch.randn(1, 77, 768 if model == "SD1.5" else 2048)
    extra = {}
    if model == "SDXL":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)}
    spent: list[float] = []
    blurring = [False]

    def hook(_module: torch.nn.Module, _args: object, out: torch.Tensor) -> torch.Tensor:
        if not blurring[0]:
            return out
        start = time.perf_counter()
        result = smooth_queries(out, h, w, sigma)
        spent.append(time.perf_counter() - start)
        return result

    handles = [
        module.register_forward_hook(hook)
        for name, module in unet.named_modules()
        if name.startswith("mid_block.") and name.endswith("attn1.to_q")
    ]

    def run(with_blur: bool) -> None:
        blurring[0] = with_blur
        with torch.inference_mode():
            unet(x, 500, encoder_hidden_states=context, **extra)

    t_plain, t_blur = _median_pair(lambda: run(False), lambda: run(True), reps)
    per_pass = sum(spent) / (reps + 1)  # the blurred pass ran reps times plus one warm-up
    return (
        f"| {model} | {size} | {len(handles)} | {t_plain * 1e3:.0f} | {t_blur * 1e3:.0f} | "
        f"{per_pass * 1e3:.3f} | {per_pass / t_plain:.3%} |"
    )


def pass_table(configs: list[tuple[str, int]], reps: int, sigma: float) -> list[str]:
    """Whole conditional UNet pass, one row, with and without the middle-block blur."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return ["(whole-pass table skipped: `pip install diffusers` to build the UNets with random weights)"]
    header = [
        "| model | image | middle attn1 layers | pass ms (no SEG blur) | pass ms (with blur) | "
        "blur ms inside the pass | blur / pass |",
        "|---|---|---|---|---|---|---|",
    ]
    return header + [_measure_pass(model, size, reps, sigma) for model, size in configs]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m seg_lib.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="512x512 only, fewer repetitions")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per measurement")
    parser.add_argument("--pass-reps", type=int, default=3, help="repetitions of each whole UNet pass")
    parser.add_argument("--no-pass", action="store_true", help="skip the whole-pass table")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:  # on a shared machine one thread avoids waiting on a descheduled worker at every op
        torch.set_num_threads(args.threads)
    reps = args.reps or (5 if args.quick else 20)
    sizes = (512,) if args.quick else (512, 1024)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu\n")
    print("Blur of one row of queries vs the self-attention it feeds (same shapes):\n")
    print("\n".join(layer_table(sizes, reps)))
    print("\nA smoothed row's self-attention, blur included: finite sigma vs sigma = inf (one query per row):\n")
    print("\n".join(smoothed_attention_table(sizes, reps)))
    if not args.no_pass:
        configs = [("SD1.5", 512)] if args.quick else [("SD1.5", 512), ("SDXL", 1024)]
        print("\nOne conditional UNet pass with the middle block's queries blurred (sigma 10):\n")
        print("\n".join(pass_table(configs, args.pass_reps, 10.0)))


if __name__ == "__main__":
    main()
