"""Why a bigger batch can cost more than its rows on a CPU: the attention of one 64x64 layer, timed by rows.

    python -m seg_lib.bench_rows [--tokens 4096] [--heads 8] [--dim 40] [--hold-gib 6] [--reps 3]

On the CPU the Forge-family hosts run sub-quadratic attention, and with a CPU's free memory a 64x64 layer's
scores come in one chunk: a ``baddbmm`` into a new ``rows*heads x tokens x tokens`` tensor, its softmax into
another, then a ``bmm``. Each of those tensors is fresh memory (about 1 GiB per 2 rows at 512x512 on SD1.5),
so part of the time is the kernel giving the process new pages, which costs what the machine makes it cost.
This times that attention for 2 rows (a CFG step), 3 rows (the fast path's batch) and 2 + 1 rows in two calls
(what the separate pass runs), interleaved, with ``--hold-gib`` of memory held by the process as a WebUI holds
its model, and prints seconds per row and the minor page faults per call. Run it once as is and once with
glibc told to keep freed memory (``MALLOC_MMAP_THRESHOLD_=8589934592 MALLOC_TRIM_THRESHOLD_=17179869184``):
the difference is the price of fresh pages, which no kernel choice of SEG's changes. (A WebUI generates in a
worker thread, whose glibc arena maps big blocks anyway: there it also takes ``MALLOC_ARENA_MAX=1``.)
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

CASES = {"2 rows": (2,), "3 rows": (3,), "2 + 1 rows": (2, 1)}


def one_chunk_attention(q: torch.Tensor, k_t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Sub-quadratic attention when the whole query and key ranges fit one chunk (the hosts' CPU case)."""
    scores = torch.baddbmm(
        torch.empty(1, 1, 1, dtype=q.dtype), q, k_t, alpha=q.shape[-1] ** -0.5, beta=0
    )  # a new rows*heads x tokens x tokens tensor
    probs = scores.softmax(dim=-1)  # and another
    del scores
    return torch.bmm(probs, v)


def layer(rows: int, heads: int, tokens: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(rows * heads, tokens, dim, generator=generator)
    k_t = torch.randn(rows * heads, dim, tokens, generator=generator)
    v = torch.randn(rows * heads, tokens, dim, generator=generator)
    return q, k_t, v


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def measure(heads: int, tokens: int, dim: int, reps: int) -> dict[str, list[tuple[float, int]]]:
    """(seconds, minor faults) of each case per repetition, the cases interleaved after one warm-up each."""
    inputs = {
        name: [layer(rows, heads, tokens, dim, seed) for seed, rows in enumerate(parts)]
        for name, parts in CASES.items()
    }

    def run(name: str) -> None:
        for q, k_t, v in inputs[name]:
            one_chunk_attention(q, k_t, v)

    results: dict[str, list[tuple[float, int]]] = {name: [] for name in CASES}
    with torch.no_grad():
        for name in CASES:
            run(name)
        for _ in range(reps):
            for name in CASES:
                faults, start = _faults(), time.perf_counter()
                run(name)
                results[name].append((time.perf_counter() - start, _faults() - faults))
    return results


def report(results: dict[str, list[tuple[float, int]]]) -> list[str]:
    lines = []
    for name, values in results.items():
        rows = sum(CASES[name])
        seconds = statistics.median(value for value, _ in values)
        each = ", ".join(f"{value:.3f}" for value, _ in values)
        faults = statistics.median(fault for _, fault in values)
        lines.append(
            f"{name}: {seconds / rows:.3f} s per row (median {seconds:.3f} s; each {each}); {faults:.0f} minor faults"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m seg_lib.bench_rows", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="tokens of the layer (4096: SD1.5 at 512)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=40, help="channels per head")
    parser.add_argument("--hold-gib", type=float, default=6.0, help="memory the process holds, as a WebUI's model")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: as a server pinned to one core)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    held = torch.ones(int(args.hold_gib * 2**28)) if args.hold_gib > 0 else None  # touched, so it is resident
    print(f"one-chunk attention, {args.heads} heads x {args.dim}, {args.tokens} tokens, {args.hold_gib:g} GiB held:")
    for line in report(measure(args.heads, args.tokens, args.dim, args.reps)):
        print("  " + line)
    del held


if __name__ == "__main__":
    main()
